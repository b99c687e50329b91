"""Per-client vectors (EF residuals, EF21 estimates, control variates) for thousands of clients.

A :class:`VectorStore` keeps one flat vector per client under a name. Memory backend: tensors in
``dtype`` (``float16``/``bfloat16`` halve the footprint, at the cost of approximate state). Disk
backend (``offload_dir``): one safetensors file per client and name, so only the clients of the
current round are in RAM — the way to run 1,000+ clients with error feedback on a large model.
No pickle: files are safetensors.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedsqueeze.errors import ConfigError


class VectorStore:
    """``get``/``set`` flat per-client vectors; ``state_dict``/``load_state_dict`` for checkpoints."""

    def __init__(
        self, name: str, *, dtype: torch.dtype = torch.float32, offload_dir: str | Path | None = None
    ):
        if "/" in name:
            raise ConfigError(f"store name must not contain '/': {name!r}")
        self.name = name
        self.dtype = dtype
        self.offload_dir = Path(offload_dir) / name if offload_dir is not None else None
        self._mem: dict[int, torch.Tensor] = {}
        if self.offload_dir is not None:
            self.offload_dir.mkdir(parents=True, exist_ok=True)

    def _path(self, client: int) -> Path:
        assert self.offload_dir is not None
        return self.offload_dir / f"{int(client)}.safetensors"

    def get(self, client: int) -> torch.Tensor | None:
        """The client's vector as float32, or None if never set."""
        if self.offload_dir is None:
            t = self._mem.get(int(client))
            return None if t is None else t.to(torch.float32)
        p = self._path(client)
        if not p.exists():
            return None
        return load_file(str(p))["v"].to(torch.float32)

    def set(self, client: int, value: torch.Tensor) -> None:
        v = value.detach().reshape(-1).to(self.dtype).contiguous()
        if self.offload_dir is None:
            self._mem[int(client)] = v.clone() if v.data_ptr() == value.data_ptr() else v
        else:
            tmp = self._path(client).with_suffix(".tmp")
            save_file({"v": v}, str(tmp))
            os.replace(tmp, self._path(client))

    def discard(self, client: int) -> None:
        """Forget the client's vector (no-op if it has none)."""
        if self.offload_dir is None:
            self._mem.pop(int(client), None)
        else:
            self._path(client).unlink(missing_ok=True)

    def clients(self) -> list[int]:
        if self.offload_dir is None:
            return sorted(self._mem)
        return sorted(int(p.stem) for p in self.offload_dir.glob("*.safetensors"))

    @property
    def nbytes_ram(self) -> int:
        """Bytes held in RAM (0 for the disk backend, which loads per use)."""
        return sum(t.numel() * t.element_size() for t in self._mem.values())

    @property
    def nbytes_disk(self) -> int:
        if self.offload_dir is None:
            return 0
        return sum(p.stat().st_size for p in self.offload_dir.glob("*.safetensors"))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{self.name}/{c}": self.get(c).to(self.dtype) for c in self.clients()}  # type: ignore[union-attr]

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        mine = {k: v for k, v in state.items() if k.startswith(self.name + "/")}
        parsed = {}
        for k, v in mine.items():
            try:
                parsed[int(k.split("/", 1)[1])] = v
            except ValueError:
                raise ConfigError(f"checkpoint key {k!r} does not name a client") from None
        self.clear()
        for c, v in parsed.items():
            self.set(c, v)

    def clear(self) -> None:
        self._mem.clear()
        if self.offload_dir is not None and self.offload_dir.exists():
            shutil.rmtree(self.offload_dir)
            self.offload_dir.mkdir(parents=True)
