"""Channels: a codec (plus error feedback) between a sender and a receiver, per direction.

The unit on the wire is a *model container* (``fedsqueeze.wire.container``): one frame per named
parameter tensor, each coded with the direction's codec. What the receiver uses is always decoded
from the payload bytes, and every byte count is ``len(payload)``.

* :class:`UplinkChannel`: client -> server, per client, carrying the client's model difference.
  ``ef14`` keeps ``corrected - decoded`` per client; ``ef21`` keeps an estimate ``g_i`` per client
  (sender and server hold identical copies, both built from the payload bytes) and sends
  ``C(delta - g_i)``; the server uses ``g_i`` as the client's update. With a ``powersgd`` codec the
  channel also warm-starts each client's power step from the ``Q`` factors of its previous message
  (Vogels et al. 2019, "reuse query"): the ``Q``s live in the channel's per-client store, never in
  the (stateless) codec.
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
from fedsqueeze.codecs.lowrank import PowerSGD, compressed_rank, matrix_shape
from fedsqueeze.errors import ConfigError, DecodeError
from fedsqueeze.sim.state import VectorStore
from fedsqueeze.wire.container import encode_container


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


#: the name of the single frame of a ``scope="model"`` container
MODEL_FRAME = "model"


class ModelCodec:
    """Encode a flat model vector as a container of frames, and back.

    ``scope="tensor"`` (default): one frame per parameter tensor, each coded on its own (per-layer
    scales, per-tensor top-k, matrices for PowerSGD). ``scope="model"``: one frame, named
    ``"model"``, holding the whole flat float32 vector (shape ``(numel,)``): selection and sketches
    are global over the model, as in FetchSGD's single CountSketch of the whole update.
    """

    def __init__(self, codec: Codec | str, layout: ParamLayout, *, scope: str = "tensor") -> None:
        if scope not in ("tensor", "model"):
            raise ConfigError(f"model codec scope must be 'tensor' or 'model', got {scope!r}")
        self.codec = parse_spec(codec) if isinstance(codec, str) else codec
        self.layout = layout
        self.scope = scope
        #: the layout on the wire: the model's, or one flat tensor
        self.wire = (
            layout
            if scope == "tensor"
            else ParamLayout((MODEL_FRAME,), ((layout.numel,),), (0,), layout.numel)
        )

    def encode(self, flat: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        return encode_state_dict(self.wire.unflatten(flat), self.codec, rng=rng)

    def decode(self, payload: bytes) -> torch.Tensor:
        state = decode_state_dict(payload)
        if list(state) != list(self.wire.names):
            raise DecodeError(
                f"model payload names do not match the {self.scope}-scope layout "
                f"({'the model parameters' if self.scope == 'tensor' else repr(MODEL_FRAME)})"
            )
        for name, shape in zip(self.wire.names, self.wire.shapes, strict=True):
            if tuple(state[name].shape) != shape:
                raise DecodeError(
                    f"model payload: {name} has shape {tuple(state[name].shape)}, expected {shape}"
                )
        return self.wire.flatten(state)


@dataclass(frozen=True)
class Delivery:
    """One transfer: the bytes that crossed the network and what the receiver rebuilt from them."""

    payload: bytes
    decoded: torch.Tensor
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "nbytes", len(self.payload))


class PowerSGDWarmStart:
    """Per-client warm starts of PowerSGD over a whole model (Vogels, Karimireddy, Jaggi 2019, §3).

    Every parameter tensor sent in low rank (``compressed_rank(shape, rank) = r > 0``, viewed as an
    ``n x m`` matrix) has a right factor ``Q`` (``m x r``). Message ``t`` of a client starts its power
    step from the ``Q`` of its message ``t - 1``::

        P = M_t Q_{t-1},   P^ = orth(P),   Q_t = M_t^T P^,   payload = (P^, Q_t)

    and the first message from a random ``Q_0`` (seeded from the rng, as the stateless codec). The
    ``Q``s of one client are kept as *one* flat vector (the tensors' ``Q`` row-major, in the model's
    parameter order; ``numel = sum_l m_l r_l``) in a :class:`~fedsqueeze.sim.state.VectorStore`, so
    they follow ``state_dtype`` and ``state_offload`` and go into checkpoints like EF residuals.
    State memory: ``4 * numel`` bytes per client that has sent (float32; half for float16).
    The receiver needs none of it: each payload carries ``P^`` and ``Q``.
    """

    def __init__(
        self,
        codec: PowerSGD,
        layout: ParamLayout,
        *,
        dtype: torch.dtype = torch.float32,
        offload_dir: str | None = None,
    ) -> None:
        self.codec = codec
        self.layout = layout
        # (offset, m, r) of each tensor's Q in the flat vector; r = 0: sent dense, no Q
        self.slots: list[tuple[int, int, int]] = []
        off = 0
        for shape in layout.shapes:
            r = compressed_rank(shape, codec.rank)
            m = matrix_shape(shape)[1] if r else 0
            self.slots.append((off, m, r))
            off += m * r
        self.numel = off
        self.store = VectorStore("uplink_powersgd_q", dtype=dtype, offload_dir=offload_dir)

    def encode(self, client: int, flat: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        """The model container payload of ``flat`` for ``client``; updates the client's ``Q``s."""
        prev = self.store.get(client)
        q_new = torch.zeros(self.numel, dtype=torch.float32)
        frames: dict[str, bytes] = {}
        for name, t, (off, m, r) in zip(
            self.layout.names, self.layout.unflatten(flat).values(), self.slots, strict=True
        ):
            q0 = None if prev is None or r == 0 else prev[off : off + m * r].view(m, r)
            msg = self.codec.encode_warm(t, q0, rng=rng)
            frames[name] = msg.payload
            if msg.q is not None:
                q_new[off : off + m * r] = msg.q.reshape(-1)
        self.store.set(client, q_new)
        return encode_container(frames)


class UplinkChannel:
    """Client -> server transfers of model differences, with optional EF14/EF21 per client.

    Per-client state (EF residuals or EF21 estimates, PowerSGD warm-start ``Q``s) lives in the
    ``VectorStore`` objects listed by :meth:`stores`, in ``state_dtype`` and on disk under
    ``offload_dir`` when given. ``warm_start=False`` makes a ``powersgd`` uplink stateless
    (every message from a fresh random ``Q``). ``scope``: see :class:`ModelCodec`.
    """

    def __init__(
        self,
        codec: str,
        layout: ParamLayout,
        *,
        ef: str = "none",
        state_dtype: torch.dtype = torch.float32,
        offload_dir: str | None = None,
        warm_start: bool = True,
        scope: str = "tensor",
    ) -> None:
        self.mc = ModelCodec(codec, layout, scope=scope)
        self.ef = ef
        self.store = (
            VectorStore(f"uplink_{ef}", dtype=state_dtype, offload_dir=offload_dir) if ef != "none" else None
        )
        self.warm: PowerSGDWarmStart | None = None
        if warm_start and isinstance(self.mc.codec, PowerSGD):
            warm = PowerSGDWarmStart(self.mc.codec, self.mc.wire, dtype=state_dtype, offload_dir=offload_dir)
            self.warm = warm if warm.numel else None

    def stores(self) -> list[VectorStore]:
        """The channel's per-client state stores (EF, then PowerSGD warm starts), for checkpoints."""
        return [st for st in (self.store, self.warm.store if self.warm else None) if st is not None]

    @property
    def nbytes_ram(self) -> int:
        """Bytes of per-client state held in RAM (all stores)."""
        return sum(st.nbytes_ram for st in self.stores())

    @property
    def nbytes_disk(self) -> int:
        """Bytes of per-client state offloaded to disk (all stores)."""
        return sum(st.nbytes_disk for st in self.stores())

    def _encode(self, client: int, x: torch.Tensor, rng: torch.Generator | None) -> bytes:
        if self.warm is not None:
            return self.warm.encode(client, x, rng=rng)
        return self.mc.encode(x, rng=rng)

    def encode(self, client: int, delta: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        """Only the payload of ``delta`` for ``client`` (no decoding), for receivers that combine
        payload bytes directly (e.g. summed CountSketch tables). Not available with error feedback,
        whose state needs the decoded message."""
        if self.store is not None:
            raise ConfigError(
                f"UplinkChannel.encode: uplink_ef = {self.ef!r} needs the decoded message; use send()"
            )
        return self._encode(client, delta, rng)

    def send(self, client: int, delta: torch.Tensor, *, rng: torch.Generator | None = None) -> Delivery:
        """Encode ``delta`` for ``client``; returns the payload and the server's view of the update."""
        if self.store is None:
            payload = self._encode(client, delta, rng)
            return Delivery(payload, self.mc.decode(payload))
        prev = self.store.get(client)
        if self.ef == "ef14":
            corrected = delta if prev is None else delta + prev
            payload = self._encode(client, corrected, rng)
            decoded = self.mc.decode(payload)
            self.store.set(client, corrected - decoded)
            return Delivery(payload, decoded)
        # ef21: send C(delta - g_i); both ends set g_i += decoded; the update used is g_i
        g = torch.zeros_like(delta) if prev is None else prev
        payload = self._encode(client, delta - g, rng)
        g_new = g + self.mc.decode(payload)
        self.store.set(client, g_new)
        return Delivery(payload, g_new)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every store's ``{"<store>/<client>": vector}`` (offloaded stores are read from disk)."""
        out: dict[str, torch.Tensor] = {}
        for st in self.stores():
            out.update(st.state_dict())
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        for st in self.stores():
            st.load_state_dict(state)


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
