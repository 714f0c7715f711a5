"""Reading and writing the package's files: plain data only, read safely, written atomically.

Files hold tensors, dicts, lists, strings and numbers (``torch.save``) and are read with
``torch.load(..., weights_only=True)``: loading never runs code from a file.
"""

from __future__ import annotations

import os
import pickle
import stat
import tempfile
import zipfile
from typing import Any, Union

import torch

__all__ = ["check_folder", "check_writable", "read_plain", "write_atomic", "write_text_atomic"]

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


def write_atomic(blob: Any, path: PathLike, prefix: str = ".torchdyn-hypersolvers-", force: bool = False) -> None:
    """``torch.save(blob)`` to ``path`` atomically: a temporary file next to it, then a rename.

    A symbolic link is followed: the link stays and its target is replaced. A file that is replaced
    keeps its permissions; a new file gets the process's umask (as ``open`` would give it). A
    read-only file is refused (``PermissionError``) unless ``force``; a missing folder is a
    ``FileNotFoundError`` naming it, before anything is written."""
    _replace_atomically(path, prefix, force, "wb", lambda handle: torch.save(blob, handle))


def write_text_atomic(text: str, path: PathLike, prefix: str = ".torchdyn-hypersolvers-", force: bool = False) -> None:
    """``text`` (UTF-8) to ``path`` atomically, with the rules of :func:`write_atomic` (a link is followed,
    a replaced file keeps its mode, a new one gets the umask's, a read-only one is refused unless ``force``)."""
    _replace_atomically(path, prefix, force, "w", lambda handle: handle.write(text))


def _replace_atomically(path: PathLike, prefix: str, force: bool, mode: str, write) -> None:
    """``write(handle)`` into a temporary file next to ``path``, then rename it over ``path``."""
    path = check_folder(path)
    permissions = _mode_for(path, force)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as handle:
            write(handle)
        os.chmod(tmp, permissions)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def check_writable(path: PathLike, force: bool = False) -> str:
    """``path`` resolved, after the checks :func:`write_atomic` makes before writing (its folder exists; a
    read-only file is a ``PermissionError`` unless ``force``): call it on every file of a set before writing any."""
    path = check_folder(path)
    _mode_for(path, force)
    return path


def check_folder(path: PathLike) -> str:
    """``path`` resolved (symbolic links followed), or a ``FileNotFoundError`` when its folder does not
    exist: call it before costly work whose result goes there."""
    path = os.path.realpath(os.fspath(path))
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist; create it first")
    return path


def _mode_for(path: str, force: bool) -> int:
    """The permission bits the written file gets: those of the file it replaces, else 0o666 less the umask."""
    if os.path.exists(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if not mode & stat.S_IWUSR and not force:
            raise PermissionError(
                f"{path} is read-only (mode {mode:o}); pass force=True to replace it, or make it writable first"
            )
        return mode
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _cuda_unavailable(map_location) -> bool:
    if torch.cuda.is_available() or not isinstance(map_location, (str, torch.device)):
        return False
    try:
        return torch.device(map_location).type == "cuda"
    except RuntimeError:
        return False
