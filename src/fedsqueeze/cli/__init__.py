"""Command line interface: thin Typer commands over library calls (entry point ``fedsqueeze``).

The commands live in :mod:`fedsqueeze.cli.main` (``python -m fedsqueeze.cli.main`` runs them too);
every one of them prints, the library never does. ``fedsqueeze.cli.app`` is imported lazily so
that running the module with ``-m`` does not import it twice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name == "app":
        from fedsqueeze.cli.main import app

        return app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
