"""Reading and writing the package's files: plain data only, read safely, written atomically.

Files hold tensors, dicts, lists, strings and numbers (``torch.save``) and are read with
``torch.load(..., weights_only=True)``: loading never runs code from a file.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from typing import Any, Union

import torch

__all__ = ["read_plain", "write_atomic"]

PathLike = Union[str, os.PathLike]

_UNREADABLE = (
    OSError,
    RuntimeError,
    pickle.UnpicklingError,
    EOFError,
    zipfile.BadZipFile,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    AttributeError,
    UnicodeDecodeError,
)


def read_plain(path: PathLike, map_location, what: str) -> Any:
    """The plain data in ``path``; a truncated, corrupt or foreign file is a ``ValueError``
    naming the file and ``what`` it should have been (a missing file stays ``FileNotFoundError``)."""
    if _cuda_unavailable(map_location):
        raise ValueError(
            f"cannot load {os.fspath(path)!s} with map_location={map_location!r}: CUDA is not available on this "
            "machine; load it with map_location='cpu' (the default) and move it later"
        )
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except _UNREADABLE as err:
        raise ValueError(
            f"cannot read {os.fspath(path)!s} as {what} (truncated, corrupt, or holding objects that "
            f"weights_only loading refuses): {type(err).__name__}: {err}"
        ) from err


def write_atomic(blob: Any, path: PathLike, prefix: str = ".torchdyn-hypersolvers-") -> None:
    """``torch.save(blob)`` to ``path`` atomically: a temporary file next to it, then a rename.
    A symbolic link is followed: the link stays and its target is replaced."""
    path = os.path.realpath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(blob, handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _cuda_unavailable(map_location) -> bool:
    if torch.cuda.is_available() or not isinstance(map_location, (str, torch.device)):
        return False
    try:
        return torch.device(map_location).type == "cuda"
    except RuntimeError:
        return False
