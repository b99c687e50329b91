"""PowerSGD (Vogels, Karimireddy, Jaggi 2019) in federated form: rank-``r`` factors of one tensor.

A tensor with ``ndim >= 2`` is viewed as the matrix ``M`` of shape ``(n, m) = (shape[0], numel /
shape[0])`` (a conv kernel ``(out, in, kh, kw)`` becomes ``(out, in*kh*kw)``). One step of subspace
iteration from a start ``Q0`` (``m x r``) gives::

    P  = M Q0                 (n x r)
    P^ = orthonormalize(P)    Householder QR (``torch.linalg.qr``, reduced); orthonormal columns
                              even when P is rank-deficient
    Q  = M^T P^               (m x r)
    decode(payload) = P^ Q^T  = P^ P^^T M, the projection of M onto span(P^)

with ``r = min(rank, n, m)``. Both factors travel as float32, so the receiver needs nothing but the
payload. The codec is biased (pair it with error feedback) and not summable: the sum of clients'
``P^_i Q_i^T`` is not a rank-``r`` product.

``Q0``: the stateless codec draws a 64-bit seed from ``rng`` and expands it to a standard Gaussian
``m x r`` matrix (portable: SplitMix64 stream + Box-Muller, see :func:`initial_q`); the seed goes in
the payload so anyone can re-derive ``Q0`` (decoding does not need it). :class:`PowerSGDState` warm
starts instead: it feeds each client's previous ``Q`` for that tensor back as ``Q0``, which is the
paper's "reuse query" and makes repeated encodes of a slowly changing matrix converge to its best
rank-``r`` approximation (one more power-iteration step per message). If a warm ``Q`` has a zero
column the codec falls back to a fresh random start.

Dense fallback (said in the payload's ``mode``): tensors with ``ndim < 2`` (biases, norms, scalars)
and matrices where the factors would cost at least as much as the matrix (``r (n + m) >= n m``,
e.g. tiny or very thin matrices) are sent as ``n * m`` float32 values, exactly as PowerSGD leaves
1-D parameters uncompressed.

Body (little-endian)::

    mode u8 (0 = dense, 1 = low rank) | flags u8 (bit0 = warm-started Q0) | rank u16 | n u32 | m u32
    | seed u64                                                                      20 bytes
    mode 0: n*m x float32 (rank, flags and seed are 0)
    mode 1: P^ as n x r float32, row-major, then Q as m x r float32, row-major (seed is 0 when warm)

``(n, m)`` must equal the matrix view of the header's shape (``(numel, 1)`` for ``ndim <= 1``);
mode 1 needs ``ndim >= 2`` and ``1 <= rank <= min(n, m)``; all values must be finite, and so must
the product. Size: ``20 + 4 r (n + m)`` bytes (``20 + 4 n m`` dense) plus the frame header.
Tune ``rank`` first: the paper trains ResNet-18 on CIFAR-10 to full accuracy at rank 2 with error
feedback and warm start.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from fedsqueeze.codecs.base import Codec, random_seed
from fedsqueeze.codecs.registry import register
from fedsqueeze.codecs.sketch import GOLDEN, mix64
from fedsqueeze.codecs.spec import SpecArgs
from fedsqueeze.errors import ConfigError, DecodeError, EncodeError
from fedsqueeze.wire.bits import Reader
from fedsqueeze.wire.frame import FrameHeader, build_frame

if TYPE_CHECKING:
    # Imported lazily at run time: fedsqueeze.feedback imports fedsqueeze.codecs, which imports us.
    from fedsqueeze.feedback.store import ClientId

DENSE, LOWRANK = 0, 1
FLAG_WARM = 1
_PARAMS = struct.Struct("<BBHIIQ")
PARAMS_NBYTES = _PARAMS.size  # 20
MAX_RANK = (1 << 16) - 1


def matrix_shape(shape: tuple[int, ...] | torch.Size) -> tuple[int, int]:
    """The ``(n, m)`` matrix view of a tensor shape: ``(shape[0], prod(shape[1:]))``; ``(numel, 1)``
    for 1-D and 0-D shapes."""
    if len(shape) >= 2:
        return int(shape[0]), math.prod(int(s) for s in shape[1:])
    return (math.prod(int(s) for s in shape), 1)


def compressed_rank(shape: tuple[int, ...] | torch.Size, rank: int) -> int:
    """The rank a tensor of ``shape`` is sent at, or 0 when it is sent dense (module docstring)."""
    if len(shape) < 2:
        return 0
    n, m = matrix_shape(shape)
    r = min(rank, n, m)
    if r == 0 or r * (n + m) >= n * m:
        return 0
    return r


def initial_q(seed: int, m: int, r: int) -> torch.Tensor:
    """A standard Gaussian ``m x r`` float32 matrix from a 64-bit seed, the same on every platform.

    Entry ``t`` (row-major) uses the 64-bit words ``H(2t)``, ``H(2t + 1)`` with
    ``H(u) = mix64(mix64(seed) + (u + 1) * 0x9E3779B97F4A7C15)`` (a SplitMix64 stream) and Box-Muller:
    ``sqrt(-2 ln u1) cos(2 pi u2)``, ``u1 = ((H(2t) >> 11) + 1) / 2**53``, ``u2 = (H(2t+1) >> 11) / 2**53``,
    in float64 (identical wherever libm rounds ``log``/``cos`` correctly to the last bit), then float32.
    """
    count = m * r
    base = mix64(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64))[0]
    with np.errstate(over="ignore"):
        h = mix64(np.arange(1, 2 * count + 1, dtype=np.uint64) * GOLDEN + base)
    top = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
    u1, u2 = top[0::2] + 2.0**-53, top[1::2]
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    return torch.from_numpy(z.astype(np.float32).reshape(m, r))


@dataclass(frozen=True)
class LowRankFactors:
    """One power-iteration step: ``p_hat`` (n x r, orthonormal columns) and ``q`` (m x r)."""

    p_hat: torch.Tensor
    q: torch.Tensor

    def product(self) -> torch.Tensor:
        """``p_hat @ q.T``, the rank-``r`` approximation."""
        return self.p_hat @ self.q.T


def power_step(matrix: torch.Tensor, q0: torch.Tensor) -> LowRankFactors:
    """``P^ = orth(M Q0)``, ``Q = M^T P^`` for a float32 ``M`` (n x m) and ``Q0`` (m x r)."""
    p = matrix @ q0
    p_hat = torch.linalg.qr(p, mode="reduced").Q.contiguous()
    return LowRankFactors(p_hat=p_hat, q=(matrix.T @ p_hat).contiguous())


@dataclass(frozen=True)
class PowerSGDMessage:
    """What :meth:`PowerSGD.encode_warm` returns: the payload and the new ``Q`` (None when dense)."""

    payload: bytes
    q: torch.Tensor | None


def _le32(t: torch.Tensor) -> bytes:
    return t.contiguous().numpy().astype("<f4", copy=False).tobytes()


@register
class PowerSGD(Codec):
    """Rank-``r`` PowerSGD factors of one tensor, float32 (see module docstring). Biased."""

    codec_id = 84
    name = "powersgd"
    stochastic = True

    def __init__(self, rank: int = 1) -> None:
        if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= MAX_RANK:
            raise ConfigError(f"powersgd: rank must be an integer in 1..{MAX_RANK}, got {rank!r}")
        self.rank = rank

    @classmethod
    def from_spec(cls, args: SpecArgs, **_: Any) -> Codec:
        rank = args.int("rank", 1, positional=True, lo=1, hi=MAX_RANK)
        args.finish()
        return cls(rank)

    @property
    def spec(self) -> str:
        return f"powersgd:rank={self.rank}"

    def encode(self, x: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        return self.encode_warm(x, None, rng=rng).payload

    def encode_warm(
        self, x: torch.Tensor, q: torch.Tensor | None, *, rng: torch.Generator | None = None
    ) -> PowerSGDMessage:
        """Encode ``x`` starting the power step from ``q`` (``m x r``; None: random from ``rng``).

        Returns the payload and the new ``Q`` to warm-start the next message with (None when the
        tensor went dense). Raises :class:`EncodeError` when ``q`` has the wrong shape or is not
        finite.
        """
        t = self._check_input(x)
        shape = tuple(t.shape)
        n, m = matrix_shape(shape)
        flat = t.detach().reshape(-1).to(device="cpu", dtype=torch.float32).contiguous()
        r = compressed_rank(shape, self.rank)
        if r == 0:
            body = [_PARAMS.pack(DENSE, 0, 0, n, m, 0), _le32(flat)]
            return PowerSGDMessage(build_frame(self.codec_id, t.dtype, shape, body), None)
        flags, seed = 0, 0
        if q is not None:
            q0 = q.detach().to(device="cpu", dtype=torch.float32)
            if tuple(q0.shape) != (m, r):
                raise EncodeError(
                    f"powersgd: warm-start Q has shape {tuple(q0.shape)}, a {shape} tensor at rank {r} "
                    f"needs ({m}, {r}); reset the warm-start state after changing rank or shape"
                )
            if not bool(torch.isfinite(q0).all()):
                raise EncodeError("powersgd: warm-start Q holds NaN or Inf")
            if bool((q0.abs().amax(dim=0) > 0).all()):
                flags = FLAG_WARM
        if flags != FLAG_WARM:
            seed = random_seed(rng)
            q0 = initial_q(seed, m, r)
        f = power_step(flat.view(n, m), q0)
        if not (bool(torch.isfinite(f.q).all()) and bool(torch.isfinite(f.p_hat).all())):
            raise EncodeError("powersgd: the factors overflow float32; scale the tensor down")
        body = [_PARAMS.pack(LOWRANK, flags, r, n, m, seed), _le32(f.p_hat), _le32(f.q)]
        return PowerSGDMessage(build_frame(self.codec_id, t.dtype, shape, body), f.q)

    def _encode_body(self, flat: torch.Tensor, rng: torch.Generator | None) -> bytes:
        raise NotImplementedError  # encode() is overridden: the body depends on the shape

    @classmethod
    def _decode_body(cls, body: memoryview, header: FrameHeader) -> torch.Tensor:
        r = Reader(body, "powersgd body")
        mode, flags, rank, n, m, seed = (int(v) for v in r.unpack("BBHIIQ", "parameters"))
        if (n, m) != matrix_shape(header.shape):
            raise DecodeError(
                f"powersgd: body says a {n} x {m} matrix, the header's shape {header.shape} gives "
                f"{matrix_shape(header.shape)}"
            )
        if mode == DENSE:
            if rank or flags or seed:
                raise DecodeError(
                    f"powersgd: a dense body must have rank, flags and seed 0, got {rank}, {flags}, {seed}"
                )
            need = 4 * n * m
            if r.remaining != need:
                raise DecodeError(f"powersgd: dense body needs {need} value bytes, got {r.remaining}")
            out = torch.from_numpy(np.frombuffer(r.rest(), dtype="<f4").astype(np.float32))
        elif mode == LOWRANK:
            if len(header.shape) < 2:
                raise DecodeError(f"powersgd: a {len(header.shape)}-D tensor cannot be sent in low rank")
            if not 1 <= rank <= min(n, m):
                raise DecodeError(f"powersgd: rank {rank} outside 1..min(n, m) = {min(n, m)}")
            if flags > FLAG_WARM or (flags == FLAG_WARM and seed):
                raise DecodeError(f"powersgd: invalid flags {flags} (seed {seed})")
            need = 4 * rank * (n + m)
            if r.remaining != need:
                raise DecodeError(
                    f"powersgd: rank-{rank} factors of a {n} x {m} matrix need {need} bytes, "
                    f"got {r.remaining}"
                )
            p_hat = np.frombuffer(r.take(4 * rank * n, "P^"), dtype="<f4").astype(np.float32)
            q = np.frombuffer(r.rest(), dtype="<f4").astype(np.float32)
            if not (np.isfinite(p_hat).all() and np.isfinite(q).all()):
                raise DecodeError("powersgd: the factors hold NaN or Inf")
            out = (torch.from_numpy(p_hat).view(n, rank) @ torch.from_numpy(q).view(m, rank).T).reshape(-1)
        else:
            raise DecodeError(f"powersgd: unknown mode {mode}; expected 0 (dense) or 1 (low rank)")
        if not bool(torch.isfinite(out).all()):
            raise DecodeError("powersgd: the decoded tensor holds NaN or Inf")
        return out


class PowerSGDState:
    """Warm-start (and optional error-feedback) state for PowerSGD, per client and tensor name.

    Like ``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState``, but for
    federated clients: each ``(client, name)`` keeps the ``Q`` of its last message, which starts the
    next one. The receiver needs none of it (each payload carries ``P^`` and the new ``Q``).

    Parameters
    ----------
    codec:
        A :class:`PowerSGD` codec, its spec (``"powersgd:rank=2"``), or a rank.
    error_feedback:
        Also keep ``corrected - decoded`` per ``(client, name)`` and add it to the next tensor
        (EF14, as the paper and torch's hook do). Leave it False when the caller already wraps the
        messages in error feedback.
    dtype:
        Storage dtype of the state (see :class:`~fedsqueeze.feedback.store.ClientStateStore`).

    Tensor names must not contain ``"/"`` (``"layer1.weight"`` is fine). :meth:`state_dict` is flat
    ``{"q.<name>/<client>": Q, "e.<name>/<client>": residual}``, ready for safetensors.
    """

    def __init__(
        self,
        codec: PowerSGD | str | int = 1,
        *,
        error_feedback: bool = False,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(codec, str):
            from fedsqueeze.codecs.spec import parse_spec

            built = parse_spec(codec)
            if not isinstance(built, PowerSGD):
                raise ConfigError(f"PowerSGDState needs a powersgd codec, got {built.spec!r}")
            codec = built
        elif isinstance(codec, int) and not isinstance(codec, bool):
            codec = PowerSGD(codec)
        if not isinstance(codec, PowerSGD):
            raise ConfigError(f"PowerSGDState needs a PowerSGD codec, a spec or a rank, got {codec!r}")
        from fedsqueeze.feedback.store import ClientStateStore

        self.codec = codec
        self.error_feedback = bool(error_feedback)
        self.store = ClientStateStore(dtype=dtype)

    def encode(
        self, client: ClientId, name: str, tensor: torch.Tensor, rng: torch.Generator | None = None
    ) -> bytes:
        """Encode ``tensor`` for ``client``, warm-started from its previous ``Q`` under ``name``."""
        from fedsqueeze.codecs.base import decode
        from fedsqueeze.feedback.store import compute_dtype

        x = self.codec._check_input(tensor)
        q_key, e_key = f"q.{name}", f"e.{name}"
        work = compute_dtype(x.dtype)
        corrected = x
        if self.error_feedback:
            corrected = x.to(work) + self.store.get(client, e_key, like=x, dtype=work)
        q_prev = self.store.lookup(client, q_key, dtype=torch.float32)
        msg = self.codec.encode_warm(corrected.to(x.dtype), q_prev, rng=rng)
        if msg.q is not None:
            self.store.set(client, q_key, msg.q)
        if self.error_feedback:
            decoded = decode(msg.payload).to(device=corrected.device, dtype=work)
            self.store.set(client, e_key, corrected - decoded)
        return msg.payload

    def q(self, client: ClientId, name: str) -> torch.Tensor | None:
        """A copy of the client's current ``Q`` for ``name`` (None before its first low-rank message)."""
        return self.store.lookup(client, f"q.{name}")

    def reset(self, client: ClientId | None = None, name: str | None = None) -> None:
        """Forget warm starts (and residuals): one client's, one name's, both, or all when None."""
        names = [f"q.{name}", f"e.{name}"] if name is not None else None
        if client is None:
            for n in names if names is not None else [None]:
                self.store.clear(n)
        else:
            for n in names if names is not None else [None]:
                self.store.delete(client, n)

    @property
    def nbytes(self) -> int:
        """Bytes of state held (all clients, all names)."""
        return self.store.nbytes

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"q.<name>/<client>": Q, "e.<name>/<client>": residual}`` copies."""
        return self.store.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the state with ``state`` (as made by :meth:`state_dict`), validated first."""
        for key in state:
            if not isinstance(key, str) or not key.startswith(("q.", "e.")):
                raise ConfigError(
                    f"PowerSGDState: state key {key!r} does not start with 'q.' or 'e.'; was this dict "
                    "made by PowerSGDState.state_dict()?"
                )
        self.store.load_state_dict(state)

    def __repr__(self) -> str:
        return (
            f"<PowerSGDState codec={self.codec.spec!r} error_feedback={self.error_feedback} "
            f"clients={len(self.store.clients())}>"
        )
