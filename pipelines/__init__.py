"""Data pipelines: every backend yields batches per the contract in `pipelines.base`. They take
explicit values, never `fastkd.config` objects: `fastkd.data.build_loaders` maps a config onto them.

The names below load on first use, so that DALI's Python workers, which import
`pipelines.dali_source`, do not import PyTorch with this package.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BatchSpec", "Loader", "Loaders", "Shard", "loader_workers"]

_HOMES = {"BatchSpec": "base", "Loader": "base", "Loaders": "base", "Shard": "base", "loader_workers": "loaders"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f"pipelines.{_HOMES[name]}"), name)
