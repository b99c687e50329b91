"""Per-client state that persists across rounds: error-feedback residuals, EF21 estimates.

A :class:`ClientStateStore` maps ``(client, name)`` to one tensor. Client ids may be ``str`` or
``int``; both are keyed by ``str(client)``, so client ``3`` and client ``"3"`` are the *same*
client. A name is a short label such as ``"residual"`` or ``"estimate"`` (no ``"/"``); all clients'
tensors under one name share one shape (the shape of the tensor being compressed).

Memory is the cost of error feedback that papers rarely count: one full-size tensor per client and
per name, *on the client*. In a simulation all of it sits in one process, so :attr:`nbytes` reports
it and ``dtype=torch.bfloat16`` / ``torch.float16`` halves it. Reduced precision makes the state
**approximate**: every :meth:`ClientStateStore.set` rounds, so an ``ErrorFeedback`` residual no
longer holds exactly ``corrected - decoded`` and the telescoping identity
``sum(decoded) + residual == sum(inputs)`` holds only up to that rounding (relative error about
``2**-8`` per round for bfloat16, ``2**-11`` for float16). EF21 sender and receiver still agree bit
for bit, because both round the same way.

Checkpoints: :meth:`ClientStateStore.state_dict` returns flat ``{"<name>/<client>": tensor}``, which
``safetensors.torch.save`` writes as it is (no pickle anywhere); :meth:`load_state_dict` validates
keys, shapes and values before it changes anything.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping

import torch

from fedsqueeze.errors import ConfigError, DecodeError

ClientId = str | int

#: Floating dtypes a store may hold its state in.
STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def client_key(client: ClientId) -> str:
    """The string key of a client id (``3`` and ``"3"`` map to ``"3"``)."""
    if isinstance(client, bool) or not isinstance(client, str | int):
        raise ConfigError(f"client id must be a str or an int, got {type(client).__name__} {client!r}")
    key = str(client)
    if not key:
        raise ConfigError("client id must not be the empty string")
    return key


def check_name(name: str) -> str:
    """Validate a state name: a non-empty ``str`` without ``"/"`` (it separates name and client)."""
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(
            f"state name must be a non-empty string without '/', got {name!r} "
            "(use e.g. 'residual' or 'residual.layer1')"
        )
    return name


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic on state runs in: float64 stays float64, everything else is float32."""
    return torch.promote_types(dtype, torch.float32)


class ClientStateStore:
    """Named tensors per client, with memory accounting and a safetensors-friendly state dict.

    Parameters
    ----------
    dtype:
        Storage dtype of every tensor (default ``torch.float32``). ``torch.bfloat16`` or
        ``torch.float16`` halve :attr:`nbytes` but make the state approximate (module docstring).
    device:
        Where :meth:`load_state_dict` puts loaded tensors (default CPU). :meth:`set` keeps a
        tensor on the device it came from.

    Examples
    --------
    >>> store = ClientStateStore()
    >>> x = torch.ones(3)
    >>> store.get("a", "residual", like=x)          # absent: zeros shaped like ``x``
    tensor([0., 0., 0.])
    >>> store.set("a", "residual", x)
    >>> store.clients(), store.nbytes
    (['a'], 12)
    >>> sorted(store.state_dict())
    ['residual/a']
    """

    def __init__(
        self, *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ) -> None:
        if dtype not in STATE_DTYPES:
            raise ConfigError(
                f"ClientStateStore dtype must be one of {', '.join(map(str, STATE_DTYPES))}, got {dtype!r}"
            )
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._data: dict[str, dict[str, torch.Tensor]] = {}

    # ------------------------------------------------------------------ access
    def get(
        self,
        client: ClientId,
        name: str,
        like: torch.Tensor,
        *,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """A copy of the client's tensor ``name``, or zeros when it has none yet.

        The result has ``like``'s shape and device and dtype ``dtype`` (default: the store's
        dtype). It never aliases the stored state, so the caller may modify it in place.
        Raises :class:`ConfigError` when the stored tensor's shape differs from ``like``'s.
        """
        key, name = client_key(client), check_name(name)
        out_dtype = dtype if dtype is not None else self.dtype
        stored = self._data.get(name, {}).get(key)
        if stored is None:
            return torch.zeros(like.shape, dtype=out_dtype, device=like.device)
        if stored.shape != like.shape:
            raise ConfigError(
                f"client {key!r}: stored {name!r} has shape {tuple(stored.shape)}, but the tensor "
                f"given has shape {tuple(like.shape)}; feed every client's tensor with one shape, "
                "or reset() this client first"
            )
        out = stored.to(device=like.device, dtype=out_dtype)
        return out.clone() if out.data_ptr() == stored.data_ptr() else out

    def set(self, client: ClientId, name: str, value: torch.Tensor) -> None:
        """Store a copy of ``value`` (rounded to the store's dtype) as the client's ``name``.

        Raises :class:`ConfigError` when other clients' ``name`` tensors have another shape.
        """
        key, name = client_key(client), check_name(name)
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise ConfigError(
                f"ClientStateStore.set: expected a floating-point torch.Tensor for {name!r}, got "
                f"{getattr(value, 'dtype', type(value).__name__)}"
            )
        shape = self.shape(name)
        if shape is not None and value.shape != shape:
            raise ConfigError(
                f"client {key!r}: {name!r} of shape {tuple(value.shape)} does not match the shape "
                f"{tuple(shape)} other clients hold under that name"
            )
        stored = value.detach().to(self.dtype)
        if stored.data_ptr() == value.data_ptr() or not stored.is_contiguous():
            stored = stored.contiguous().clone()
        self._data.setdefault(name, {})[key] = stored

    def lookup(self, client: ClientId, name: str, *, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """A copy of the client's tensor ``name`` on its own device, or None when it has none.

        ``dtype`` converts the copy (default: the store's dtype).
        """
        stored = self._data.get(check_name(name), {}).get(client_key(client))
        if stored is None:
            return None
        return stored.to(dtype=dtype if dtype is not None else self.dtype, copy=True)

    def has(self, client: ClientId, name: str) -> bool:
        """True when the client holds a tensor under ``name``."""
        return client_key(client) in self._data.get(check_name(name), {})

    def shape(self, name: str) -> torch.Size | None:
        """The shape all tensors under ``name`` share, or None while there are none."""
        per_client = self._data.get(name)
        if not per_client:
            return None
        return next(iter(per_client.values())).shape

    def delete(self, client: ClientId, name: str | None = None) -> None:
        """Forget the client's tensor ``name`` (every name when None); absent entries are fine."""
        key = client_key(client)
        for n in [check_name(name)] if name is not None else list(self._data):
            per_client = self._data.get(n)
            if per_client is not None:
                per_client.pop(key, None)
                if not per_client:
                    del self._data[n]

    def clear(self, name: str | None = None) -> None:
        """Forget every client's tensor ``name`` (everything when None)."""
        if name is None:
            self._data.clear()
        else:
            self._data.pop(check_name(name), None)

    def clients(self, name: str | None = None) -> list[str]:
        """Sorted keys of the clients that hold state (under ``name``, or under any name)."""
        if name is not None:
            return sorted(self._data.get(check_name(name), {}))
        return sorted({k for per_client in self._data.values() for k in per_client})

    def names(self) -> list[str]:
        """Sorted names that at least one client holds."""
        return sorted(self._data)

    @property
    def nbytes(self) -> int:
        """Bytes of tensor data held (all clients, all names; Python overhead not counted)."""
        return sum(self.nbytes_of(name) for name in self._data)

    def nbytes_of(self, name: str) -> int:
        """Bytes of tensor data held under ``name`` (all clients)."""
        per_client = self._data.get(check_name(name), {})
        return sum(t.numel() * t.element_size() for t in per_client.values())

    def __len__(self) -> int:
        """Number of stored tensors."""
        return sum(len(per_client) for per_client in self._data.values())

    def __repr__(self) -> str:
        return (
            f"<ClientStateStore {len(self.clients())} clients, names={self.names()}, "
            f"dtype={self.dtype}, nbytes={self.nbytes}>"
        )

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Flat ``{"<name>/<client>": tensor}`` copies (CPU, contiguous), ready for safetensors.

        With ``names``, only those names are included.
        """
        wanted = list(self._data) if names is None else [check_name(n) for n in names]
        out: dict[str, torch.Tensor] = {}
        for name in sorted(wanted):
            for key, t in sorted(self._data.get(name, {}).items()):
                out[f"{name}/{key}"] = t.detach().to("cpu", copy=True).contiguous()
        return out

    def load_state_dict(
        self, state: Mapping[str, torch.Tensor], *, names: Collection[str] | None = None
    ) -> None:
        """Replace the state with ``state`` (as made by :meth:`state_dict`), after validating it.

        With ``names``, only keys under those names are accepted and only those names are
        replaced (other names in the store stay as they are); without it, everything is replaced.
        Tensors are converted to the store's dtype and moved to its ``device``.

        Raises
        ------
        ConfigError
            a key is not ``"<name>/<client>"``, names a state this object does not hold, or a shape
            disagrees with the other clients' or with the state currently held under that name.
        DecodeError
            a value is not a floating-point tensor or holds NaN/Inf (a corrupted checkpoint).
        """
        if not isinstance(state, Mapping):
            raise ConfigError(
                f"load_state_dict expects a mapping of 'name/client' -> torch.Tensor, got "
                f"{type(state).__name__}"
            )
        allowed = None if names is None else {check_name(n) for n in names}
        parsed: dict[str, dict[str, torch.Tensor]] = {}
        for full_key, value in state.items():
            if not isinstance(full_key, str) or "/" not in full_key:
                raise ConfigError(
                    f"state key {full_key!r} is not of the form '<name>/<client>' "
                    "(e.g. 'residual/7'); was this dict made by ClientStateStore.state_dict()?"
                )
            name, key = full_key.split("/", 1)
            if not name or not key:
                raise ConfigError(
                    f"state key {full_key!r} has an empty name or client; expected '<name>/<client>'"
                )
            if allowed is not None and name not in allowed:
                close = difflib.get_close_matches(name, sorted(allowed), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ConfigError(
                    f"state key {full_key!r}: unexpected name {name!r}, expected "
                    f"{' or '.join(repr(a + '/<client>') for a in sorted(allowed))}{hint}"
                )
            if not isinstance(value, torch.Tensor):
                raise DecodeError(f"state {full_key!r}: expected a torch.Tensor, got {type(value).__name__}")
            if not value.is_floating_point():
                raise DecodeError(f"state {full_key!r}: expected a floating-point tensor, got {value.dtype}")
            if value.numel() and not bool(torch.isfinite(value).all()):
                raise DecodeError(f"state {full_key!r} holds NaN or Inf values; the checkpoint is corrupt")
            parsed.setdefault(name, {})[key] = value
        for name, per_client in parsed.items():
            shapes = {tuple(t.shape) for t in per_client.values()}
            if len(shapes) > 1:
                first = sorted(per_client.items())[:6]
                detail = ", ".join(f"{k}: {tuple(t.shape)}" for k, t in first)
                raise ConfigError(
                    f"state {name!r}: clients disagree on the shape ({detail}); every client's "
                    "tensor under one name must have one shape"
                )
            held = self.shape(name)
            (loaded,) = shapes
            if held is not None and tuple(held) != loaded:
                raise ConfigError(
                    f"state {name!r}: the checkpoint holds shape {loaded}, this object already "
                    f"holds shape {tuple(held)}; was the checkpoint saved for another model? "
                    "(call clear() first to load a different shape on purpose)"
                )
        new = {
            name: {
                key: t.detach().to(device=self.device, dtype=self.dtype, copy=True).contiguous()
                for key, t in per_client.items()
            }
            for name, per_client in parsed.items()
        }
        if allowed is None:
            self._data = new
        else:
            for name in allowed:
                self._data.pop(name, None)
            self._data.update(new)
