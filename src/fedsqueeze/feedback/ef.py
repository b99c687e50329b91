r"""Error feedback: make biased compressors (Top-K, sign, low-bit) converge.

A biased compressor ``C`` such as Top-K drops the same small coordinates round after round, so
plain compressed gradient descent can stall far from the optimum, or diverge. Error feedback
remembers what was *not* transmitted and sends it later. Two members of the family are here.

EF14: memory / residual (:class:`ErrorFeedback`)
------------------------------------------------
Seide et al., "1-bit SGD", Interspeech 2014; Stich, Cordonnier & Jaggi, "Sparsified SGD with
memory", NeurIPS 2018; Karimireddy et al., "Error feedback fixes SignSGD", ICML 2019. Worker ``i``
keeps a residual ``e_i`` (zero at first) and, for every tensor ``p_i^t`` it would like to send::

    u_i^t     = p_i^t + e_i^t             # corrected
    m_i^t     = C(u_i^t)                  # what is transmitted (and what the receiver decodes)
    e_i^{t+1} = u_i^t - m_i^t             # residual: everything not transmitted so far

The sum telescopes: ``sum_t m_i^t + e_i^T == sum_t p_i^t``, so nothing is ever lost, only delayed.
:class:`ErrorFeedback` computes ``m_i^t`` by decoding its *own* payload, so the residual matches
what the receiver got bit for bit (including float rounding inside the codec).

Use EF14 with biased, *contractive* compressors -- ``||C(x) - x||^2 <= (1 - alpha) ||x||^2`` --
such as ``topk``, ``threshold``, sign or low-bit ``uniform``. Do **not** wrap unbiased compressors
that scale up (``randk`` with its ``d/k`` factor, ``qsgd``): they are not contractive and the
residual grows without bound (``randk:10%`` on a fixed input: ``||e|| ~ 1e12`` after 50 rounds).
Those converge without EF; or rescale them by ``1/(1 + omega)`` first.

Its weakness: with *heterogeneous* clients (different local optima) and a constant step size, EF14
only reaches an ``O(step)`` neighbourhood of the optimum; decrease the step (Stich et al. use
``~ 2/(mu (t + a))``) to get closer, or use EF21. Measured in ``tests/test_feedback.py`` (10
heterogeneous quadratics, ``d = 1000``, Top-1%): without EF the distance to the optimum stalls at
54% of the start; EF14 with step ``2/(t + 10)`` reaches 2.2% after 800 rounds and keeps improving
like ``1/t``; EF21 with constant step 0.2 reaches 0.004% after 600 rounds.

**Learning-rate placement pitfall.** Karimireddy et al. and Stich et al. feed EF the *scaled*
update ``p = lr * g`` (in FL: the model delta), so the memory lives in model units. DGC and PowerSGD
keep memory on raw gradients ``p = g`` and multiply by ``lr`` on the server. The two coincide only
for a constant ``lr``: with a schedule, raw-gradient memory that was accumulated at ``lr_old`` is
applied at ``lr_new``. Feed the scaled update (recommended), or call
``ef.rescale(lr_old / lr_new)`` whenever the learning rate changes.

EF21 (:class:`EF21Sender`, :class:`EF21Receiver`)
-------------------------------------------------
Richtárik, Sokolov & Fatkhullin, "EF21: A new, simpler, theoretically better, and practically
faster error feedback", NeurIPS 2021. Worker ``i`` and the server share an estimate ``g_i`` of the
worker's gradient; only the *change* is compressed::

    server:     x^{t+1}   = x^t - gamma * g^t,   g^t = mean_i g_i^t
    worker i:   c_i^t     = C(grad_i(x^{t+1}) - g_i^t)    # sent
    both ends:  g_i^{t+1} = g_i^t + c_i^t                  # same update on sender and receiver

As ``x`` converges, ``grad_i(x) - g_i`` shrinks to zero, so even a harsh contractive compressor
(Top-K with ``alpha = k/d``) converges linearly to the exact optimum under heterogeneity, with a
constant step size. Theory (non-convex, Thm. 1): ``gamma <= 1 / (L + L_tilde * sqrt(beta/theta))``
with ``theta = 1 - sqrt(1 - alpha)`` and ``beta = (1 - alpha) / (1 - sqrt(1 - alpha))`` -- about
``1/(L (1 + 2/alpha))``, e.g. ``1/(200 L)`` for Top-1%. It is conservative: the quadratic test
above runs 40x larger (``0.2 / L``) and still converges linearly; tune the step first.

Use EF21 when you want provable convergence with a contractive compressor (Top-K, scaled sign)
and full or regular participation. Caveats: ``g_i`` is per client on *both* ends (server memory
``n * d``); the compressor must be applied to ``x - g_i``, so its input is a difference (feed the
gradient, not the model). **Initialisation**: here ``g_i^0 = 0``, so the first message is simply
``C(grad_i)``; to start from an exact estimate, send the first round with a lossless codec
(``sender.encode(client, x, codec=parse_spec("fp32"))``). Sender and receiver must start, reset
and checkpoint together, or they silently diverge.

Which one? EF14 wraps any update (gradients, model deltas, several local steps) and needs state only
on the client. EF21 has the stronger guarantee but assumes the server keeps every ``g_i`` and
receives from each client regularly.

Examples
--------
>>> import torch
>>> from fedsqueeze import decode
>>> ef = ErrorFeedback("uniform:2")
>>> payload = ef.encode("client-0", torch.randn(100))
>>> received = decode(payload)
>>> sender, receiver = EF21Sender("uniform:2"), EF21Receiver()
>>> estimate = receiver.receive(3, sender.encode(3, torch.randn(100)))
>>> bool(torch.equal(estimate, sender.estimate(3)))
True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from fedsqueeze.codecs import Codec, decode, parse_spec
from fedsqueeze.errors import ConfigError, EncodeError
from fedsqueeze.feedback.store import ClientId, ClientStateStore, client_key, compute_dtype

__all__ = ["EF21Receiver", "EF21Sender", "ErrorFeedback"]


def _as_codec(codec: Codec | str, owner: str) -> Codec:
    if isinstance(codec, str):
        return parse_spec(codec)
    if not isinstance(codec, Codec):
        raise ConfigError(f"{owner}: expected a Codec or a spec string, got {type(codec).__name__}")
    return codec


def _check_float(x: torch.Tensor, owner: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise EncodeError(f"{owner}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise EncodeError(
            f"{owner}: error feedback needs a floating-point tensor, got {x.dtype}; send integer "
            "buffers through the lossless 'raw' codec without feedback"
        )
    return x.detach()


def _make_store(store: ClientStateStore | None, dtype: torch.dtype) -> ClientStateStore:
    if store is None:
        return ClientStateStore(dtype=dtype)
    if not isinstance(store, ClientStateStore):
        raise ConfigError(f"store must be a ClientStateStore, got {type(store).__name__}")
    return store


class ErrorFeedback:
    """EF14 ("memory"): a codec wrapper that keeps each client's untransmitted residual.

    Parameters
    ----------
    codec:
        A :class:`~fedsqueeze.codecs.Codec` or a spec string (``"topk:1%"``, ``"uniform:2"``).
    store:
        Where residuals live; a fresh :class:`ClientStateStore` by default. Share one store
        between several wrappers by giving each its own ``name``.
    name:
        The state name of the residual in the store (default ``"residual"``).
    dtype:
        Storage dtype of a fresh store (default float32; bfloat16/float16 halve memory and make
        the residual approximate). Ignored when ``store`` is given.

    Notes
    -----
    ``encode`` computes ``corrected = x + residual`` in float32 (float64 for float64 input), encodes
    ``corrected`` cast to ``x``'s dtype (so the payload has the caller's dtype), decodes its own
    payload and keeps ``residual = corrected - decoded``. The residual stays on ``x``'s device. If
    the codec refuses the input (e.g. NaN), the residual is left unchanged.
    """

    def __init__(
        self,
        codec: Codec | str,
        *,
        store: ClientStateStore | None = None,
        name: str = "residual",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.codec = _as_codec(codec, "ErrorFeedback")
        self.store = _make_store(store, dtype)
        self.name = name
        self.store.clients(name)  # validates the name

    def encode(self, client: ClientId, x: torch.Tensor, *, rng: torch.Generator | None = None) -> bytes:
        """Encode ``x + residual[client]`` and keep what the payload did not carry."""
        x = _check_float(x, "ErrorFeedback.encode")
        work = compute_dtype(x.dtype)
        corrected = x.to(work) + self.store.get(client, self.name, like=x, dtype=work)
        payload = self.codec.encode(corrected.to(x.dtype), rng=rng)
        decoded = decode(payload).to(device=corrected.device, dtype=work)
        self.store.set(client, self.name, corrected - decoded)
        return payload

    def residual(self, client: ClientId) -> torch.Tensor | None:
        """A copy of the client's residual (store dtype), or None before its first ``encode``."""
        return self.store.lookup(client, self.name)

    def reset(self, client: ClientId | None = None) -> None:
        """Drop one client's residual (all clients' when None); its next message starts fresh."""
        if client is None:
            self.store.clear(self.name)
        else:
            self.store.delete(client, self.name)

    def rescale(self, factor: float, client: ClientId | None = None) -> None:
        """Multiply residuals by ``factor`` (all clients when ``client`` is None).

        For memory on raw gradients under a learning-rate schedule: call
        ``rescale(lr_old / lr_new)`` when the rate changes (see the module docstring).
        """
        if not isinstance(factor, int | float) or not np.isfinite(factor):
            raise ConfigError(f"rescale factor must be a finite number, got {factor!r}")
        keys = self.store.clients(self.name) if client is None else [client_key(client)]
        work = compute_dtype(self.store.dtype)
        for key in keys:
            e = self.store.lookup(key, self.name, dtype=work)
            if e is not None:
                self.store.set(key, self.name, e * factor)

    def clients(self) -> list[str]:
        """Keys of the clients holding a residual."""
        return self.store.clients(self.name)

    @property
    def nbytes(self) -> int:
        """Bytes held by the residuals (the memory cost of error feedback)."""
        return self.store.nbytes_of(self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<name>/<client>": residual}``; save it with ``safetensors.torch.save``."""
        return self.store.state_dict([self.name])

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the residuals with ``state`` (validated as in ``ClientStateStore``)."""
        self.store.load_state_dict(state, names=[self.name])

    def __repr__(self) -> str:
        return f"<ErrorFeedback codec={self.codec.spec!r} clients={len(self.clients())}>"


class _EF21Side:
    """State shared by both ends of EF21: ``g_i`` per client, updated from decoded payloads."""

    def __init__(self, store: ClientStateStore | None, name: str, dtype: torch.dtype) -> None:
        self.store = _make_store(store, dtype)
        self.name = name
        self.store.clients(name)  # validates the name

    def _accumulate(self, client: ClientId, payload: bytes, device: torch.device | None) -> torch.Tensor:
        # The one update both ends run, op for op: g_i <- g_i + decode(payload). Keep it shared so
        # sender and receiver can never drift apart.
        c = decode(payload)
        work = compute_dtype(c.dtype)
        c = c.to(device=device, dtype=work)
        g = self.store.get(client, self.name, like=c, dtype=work)
        self.store.set(client, self.name, g + c)
        return self.store.get(client, self.name, like=c, dtype=work)

    def estimate(self, client: ClientId) -> torch.Tensor | None:
        """A copy of ``g_i`` (float32; float64 for float64 tensors), or None before any message."""
        return self.store.lookup(client, self.name, dtype=compute_dtype(self.store.dtype))

    def reset(self, client: ClientId | None = None) -> None:
        """Drop ``g_i`` (all when None) -- do the same on the other end, or the two diverge."""
        if client is None:
            self.store.clear(self.name)
        else:
            self.store.delete(client, self.name)

    def clients(self) -> list[str]:
        """Keys of the clients with an estimate."""
        return self.store.clients(self.name)

    @property
    def nbytes(self) -> int:
        """Bytes held by the estimates."""
        return self.store.nbytes_of(self.name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``{"<name>/<client>": g_i}``; save it with ``safetensors.torch.save``."""
        return self.store.state_dict([self.name])

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Replace the estimates with ``state`` (validated as in ``ClientStateStore``)."""
        self.store.load_state_dict(state, names=[self.name])


class EF21Sender(_EF21Side):
    """Client side of EF21: sends ``C(x - g_i)`` and updates ``g_i += decoded``.

    Parameters
    ----------
    codec:
        A contractive compressor (Top-K is the textbook choice) as a Codec or spec string.
    store, name, dtype:
        As for :class:`ErrorFeedback`; the default state name is ``"estimate"``.

    ``g_i`` starts at zero, so the first message is ``C(x)`` (module docstring for alternatives).
    """

    def __init__(
        self,
        codec: Codec | str,
        *,
        store: ClientStateStore | None = None,
        name: str = "estimate",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__(store, name, dtype)
        self.codec = _as_codec(codec, "EF21Sender")

    def encode(
        self,
        client: ClientId,
        x: torch.Tensor,
        *,
        rng: torch.Generator | None = None,
        codec: Codec | str | None = None,
    ) -> bytes:
        """Encode ``x - g_i`` (with ``codec`` for this message only, if given); update ``g_i``."""
        x = _check_float(x, "EF21Sender.encode")
        use = self.codec if codec is None else _as_codec(codec, "EF21Sender.encode")
        work = compute_dtype(x.dtype)
        diff = x.to(work) - self.store.get(client, self.name, like=x, dtype=work)
        payload = use.encode(diff.to(x.dtype), rng=rng)
        self._accumulate(client, payload, x.device)
        return payload

    def __repr__(self) -> str:
        return f"<EF21Sender codec={self.codec.spec!r} clients={len(self.clients())}>"


class EF21Receiver(_EF21Side):
    """Server side of EF21: rebuilds every ``g_i`` from the payloads alone.

    Parameters
    ----------
    store, name, dtype:
        As for :class:`EF21Sender`; use the same ``dtype`` on both ends to stay bit-identical.
    device:
        Device the estimates are built on (default CPU, where payloads decode).

    The server step is ``x <- x - gamma * receiver.mean(all_clients)``. With partial participation
    (EF21-PP) clients that did not send this round keep their old ``g_i``; pass the full client list
    to :meth:`mean` so a client never heard from counts as ``g_i = 0``.
    """

    def __init__(
        self,
        *,
        store: ClientStateStore | None = None,
        name: str = "estimate",
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__(store, name, dtype)
        self.device = torch.device(device) if device is not None else None

    def receive(self, client: ClientId, payload: bytes) -> torch.Tensor:
        """Decode ``payload``, update and return the client's ``g_i`` (a copy)."""
        return self._accumulate(client, payload, self.device)

    def mean(self, clients: Iterable[ClientId] | None = None) -> torch.Tensor:
        """``g = (1/n) sum_i g_i`` over ``clients`` (default: all with an estimate).

        Clients without an estimate count as zero (EF21's ``g_i^0 = 0``). Sums in a fixed
        (sorted) order in float32 (float64 for float64 tensors), so the result is reproducible.
        """
        keys = self.clients() if clients is None else sorted({client_key(c) for c in clients})
        shape = self.store.shape(self.name)
        if not keys or shape is None:
            raise ConfigError(
                "EF21Receiver.mean: no estimates to average yet; receive() at least one payload "
                "(and pass a non-empty client list)"
            )
        work = compute_dtype(self.store.dtype)
        total = torch.zeros(shape, dtype=work, device=self.device)
        for key in keys:
            g = self.store.lookup(key, self.name, dtype=work)
            if g is not None:
                total += g.to(total.device)
        return total / len(keys)

    def __repr__(self) -> str:
        return f"<EF21Receiver clients={len(self.clients())}>"
