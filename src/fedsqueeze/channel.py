"""Channels: a codec (plus error feedback) between a sender and a receiver, per direction.

The unit on the wire is a *model container* (``fedsqueeze.wire.container``): one frame per named
parameter tensor, each coded with the direction's codec. What the receiver uses is always decoded
from the payload bytes, and every byte count is ``len(payload)``.

* :class:`UplinkChannel`: client -> server, per client, carrying the client's model difference.
  ``ef14`` keeps ``corrected - decoded`` per client; ``ef21`` keeps an estimate ``g_i`` per client
  (sender and server hold identical copies, both built from the payload bytes) and sends
  ``C(delta - g_i)``; the server uses ``g_i`` as the client's update.
* :class:`DownlinkChannel`: server -> clients. ``mode="model"`` sends ``C(x)``, the whole model.
  ``mode="delta"`` keeps a replica ``w`` of what clients hold and broadcasts ``C(x - w)`` (with
  optional server-side EF); a client that missed broadcasts is charged the missed payloads, capped
  at a fresh lossless fetch of ``w`` (the fp32 container) — so catch-up is never free.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedsqueeze.codecs import decode_state_dict, encode_state_dict, parse_spec
from fedsqueeze.codecs.base import Codec
from fedsqueeze.errors import DecodeError
from fedsqueeze.sim.state import VectorStore


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of a model's parameters in one flat float32 vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    numel: int

    @classmethod
    def from_state(cls, state: Mapping[str, torch.Tensor]) -> ParamLayout:
        names, shapes, offsets = [], [], []
        off = 0
        for name, t in state.items():
            names.append(name)
            shapes.append(tuple(t.shape))
            offsets.append(off)
            off += t.numel()
        return cls(tuple(names), tuple(shapes), tuple(offsets), off)

    def flatten(self, state: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([state[n].detach().reshape(-1).to(torch.float32) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape, off in zip(self.names, self.shapes, self.offsets, strict=True):
            n = 1
            for s in shape:
                n *= s
            out[name] = flat[off : off + n].view(shape)
        return out


class ModelCodec:
    """Encode a flat model vector as a container of per-parameter frames, and back."""

    def __init__(self, codec: Codec | str, layout: ParamLayout) -> None:
        self.codec = parse_spec(codec) if isinstance(codec, str) else codec
        self.layout = layout

    def encode(self, flat: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        return encode_state_dict(self.layout.unflatten(flat), self.codec, rng=rng)

    def decode(self, payload: bytes) -> torch.Tensor:
        state = decode_state_dict(payload)
        if list(state) != list(self.layout.names):
            raise DecodeError("model payload names do not match the model's parameters")
        for name, shape in zip(self.layout.names, self.layout.shapes, strict=True):
            if tuple(state[name].shape) != shape:
                raise DecodeError(
                    f"model payload: {name} has shape {tuple(state[name].shape)}, expected {shape}"
                )
        return self.layout.flatten(state)


@dataclass(frozen=True)
class Delivery:
    """One transfer: the bytes that crossed the network and what the receiver rebuilt from them."""

    payload: bytes
    decoded: torch.Tensor
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", len(self.payload))


class UplinkChannel:
    """Client -> server transfers of model differences, with optional EF14/EF21 per client."""

    def __init__(
        self,
        codec: str,
        layout: ParamLayout,
        *,
        ef: str = "none",
        state_dtype: torch.dtype = torch.float32,
        offload_dir: str | None = None,
    ) -> None:
        self.mc = ModelCodec(codec, layout)
        self.ef = ef
        self.store = (
            VectorStore(f"uplink_{ef}", dtype=state_dtype, offload_dir=offload_dir) if ef != "none" else None
        )

    def send(self, client: int, delta: torch.Tensor, *, rng: torch.Generator | None = None) -> Delivery:
        """Encode ``delta`` for ``client``; returns the payload and the server's view of the update."""
        if self.store is None:
            payload = self.mc.encode(delta, rng=rng)
            return Delivery(payload, self.mc.decode(payload))
        prev = self.store.get(client)
        if self.ef == "ef14":
            corrected = delta if prev is None else delta + prev
            payload = self.mc.encode(corrected, rng=rng)
            decoded = self.mc.decode(payload)
            self.store.set(client, corrected - decoded)
            return Delivery(payload, decoded)
        # ef21: send C(delta - g_i); both ends set g_i += decoded; the update used is g_i
        g = torch.zeros_like(delta) if prev is None else prev
        payload = self.mc.encode(delta - g, rng=rng)
        g_new = g + self.mc.decode(payload)
        self.store.set(client, g_new)
        return Delivery(payload, g_new)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.store is None else self.store.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.store is not None:
            self.store.load_state_dict(state)


class DownlinkChannel:
    """Server -> clients. See the module docstring for the two modes and catch-up accounting."""

    def __init__(self, codec: str, layout: ParamLayout, *, mode: str = "delta", ef: str = "none") -> None:
        self.mc = ModelCodec(codec, layout)
        self.full = ModelCodec("fp32", layout)
        self.mode = mode
        self.ef = ef
        self.replica: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.history: list[int] = []  # payload size of each round's broadcast (delta mode)
        self.last_sync: dict[int, int] = {}  # client -> round whose broadcast it holds
        self.full_fetch_nbytes = 0

    def broadcast(self, x: torch.Tensor, round_idx: int, *, rng: torch.Generator | None = None) -> Delivery:
        """Produce this round's payload and the model clients rebuild from it."""
        if self.mode == "model":
            payload = self.mc.encode(x, rng=rng)
            return Delivery(payload, self.mc.decode(payload))
        if self.replica is None:
            self.replica = torch.zeros_like(x)
            self.full_fetch_nbytes = len(self.full.encode(x))
        target = x - self.replica
        if self.ef == "ef14" and self.residual is not None:
            target = target + self.residual
        payload = self.mc.encode(target, rng=rng)
        decoded = self.mc.decode(payload)
        if self.ef == "ef14":
            self.residual = target - decoded
        self.replica = self.replica + decoded
        while len(self.history) < round_idx:
            self.history.append(0)
        self.history.append(len(payload))
        return Delivery(payload, self.replica.clone())

    def charge(self, client: int, round_idx: int, payload_nbytes: int) -> int:
        """Bytes ``client`` downloads at ``round_idx`` to hold the current model."""
        if self.mode == "model":
            return payload_nbytes
        last = self.last_sync.get(client)
        self.last_sync[client] = round_idx
        if last is None:
            # First contact: the replica starts at zero, so the first broadcast is the whole model;
            # a client joining later fetches w losslessly unless replaying is cheaper.
            missed = sum(self.history[: round_idx + 1])
        else:
            missed = sum(self.history[last + 1 : round_idx + 1])
        return min(missed, self.full_fetch_nbytes) if missed else 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        if self.replica is not None:
            out["downlink/replica"] = self.replica
        if self.residual is not None:
            out["downlink/residual"] = self.residual
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor], meta: Mapping[str, object]) -> None:
        self.replica = state.get("downlink/replica")
        self.residual = state.get("downlink/residual")
        self.history = [int(v) for v in meta.get("history", [])]  # type: ignore[attr-defined]
        self.last_sync = {int(k): int(v) for k, v in dict(meta.get("last_sync", {})).items()}  # type: ignore[call-overload]
        self.full_fetch_nbytes = int(meta.get("full_fetch_nbytes", 0))  # type: ignore[call-overload]

    def meta(self) -> dict[str, object]:
        return {
            "history": self.history,
            "last_sync": {str(k): v for k, v in self.last_sync.items()},
            "full_fetch_nbytes": self.full_fetch_nbytes,
        }
