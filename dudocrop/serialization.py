"""Loading torch files without running code from them, and keeping what is saved loadable that way.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a model file from a download, an MLflow URI or a
shared checkpoint folder could run any call it names (``os.system``) before the loader looks at it. Every dudocrop
file holds only tensors and plain data (dicts, lists, tuples, str, int, float, bool, None), which torch's restricted
unpickler (``weights_only=True``) reads; :func:`plain` turns metadata into that form before a save.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["UnsafeFileError", "check_shapes", "load_torch", "plain"]


class UnsafeFileError(ValueError):
    """A torch file that holds more than tensors and plain data (e.g. a pickled callable): refused unread."""


def load_torch(path: str | os.PathLike, what: str = "torch file", map_location: Any = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain containers only; anything else raises
    :class:`UnsafeFileError` naming ``path`` and ``what`` it was expected to be, without running it."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(f"{path} is not a plain {what}: it holds objects other than tensors and plain data, "
                              f"which are refused unread ({str(e).splitlines()[0]})") from e


def plain(x: Any) -> Any:
    """``x`` as plain Python + tensors (mappings -> dict with str keys, tuples/lists -> list, dataclasses -> dict,
    numpy scalars/arrays -> Python numbers/lists, anything else -> str), so the file loads with weights_only=True."""
    import torch

    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [plain(v) for v in x]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return plain(dataclasses.asdict(x))
    if isinstance(x, np.generic | np.ndarray):
        return x.tolist()
    if x is None or isinstance(x, bool | int | float | str):
        return x
    return str(x)


def check_shapes(path: str | os.PathLike, expected: Mapping[str, tuple[int, ...]], stored: Mapping[str, Any]) -> None:
    """The stored tensors have exactly the names and shapes of the model the file's config describes (built on the
    ``meta`` device, no memory): raise ValueError naming ``path`` and the first differences otherwise."""
    import torch

    bad_type = sorted(k for k, v in stored.items() if not isinstance(v, torch.Tensor))
    if bad_type:
        raise ValueError(f"{path}: weights {bad_type[:3]} are not tensors")
    missing, extra = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if tuple(stored[k].shape) != tuple(expected[k]))
    if missing or extra or wrong:
        raise ValueError(f"{path}: the stored weights do not fit the model its config describes "
                         f"({sum(int(np.prod(s)) for s in expected.values()):,} parameters): missing {missing[:3]}, "
                         f"unexpected {extra[:3]}, wrong shape "
                         + ", ".join(f"{k} {tuple(stored[k].shape)} != {tuple(expected[k])}" for k in wrong[:3]))
