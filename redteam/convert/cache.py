"""Convert a model file once: the converted form is stored in the redteam cache (``<cache>/converted``) and read
back on later loads. Every format's loader goes through :func:`convert_once`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from redteam.assets import cache_dir, save_atomic

T = TypeVar("T")


def convert_once(key: str, convert: Callable[[], T], to_data: Callable[[T], Any], from_data: Callable[[Any], T]) -> T:
    """``convert()``'s result, computed on the first load and read from the cache afterwards.

    Args:
        key: the file name in the cache: the format, the source's checksum and the converter version (bumped when
            the stored form or what the converter computes changes, so stale entries are redone).
        convert: reads the source and converts it.
        to_data: the converted form -> plain data (tuples, lists, dicts, strings, numbers, numpy arrays), so the
            file loads with ``torch.load(weights_only=True)`` and runs no pickled code.
        from_data: the inverse of ``to_data``.
    """
    path = cache_dir() / "converted" / f"{key}.pt"
    try:
        return from_data(_map_leaves(torch.load(path, weights_only=True), Tensor, lambda t: t.numpy()))
    except Exception:  # absent or damaged entry: convert again (outside the handler: errors read as the converter's)
        pass
    converted = convert()
    save_atomic(_map_leaves(to_data(converted), np.ndarray, _array_to_tensor), path)
    return converted


def _array_to_tensor(array: np.ndarray) -> Tensor:
    return torch.from_numpy(np.array(array, order="C"))  # keeps 0-d arrays 0-d, unlike ascontiguousarray


def _map_leaves(data: Any, kind: type, fn: Callable[[Any], Any]) -> Any:
    """``data`` with every leaf of type ``kind`` inside tuples, lists and dict values replaced by ``fn(leaf)``."""
    if isinstance(data, kind):
        return fn(data)
    if isinstance(data, dict):
        return {key: _map_leaves(value, kind, fn) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_map_leaves(item, kind, fn) for item in data)
    return data
