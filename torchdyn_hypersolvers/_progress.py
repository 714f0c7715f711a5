"""Progress bars: tqdm's where it is installed and the output is a terminal, nothing otherwise."""

from __future__ import annotations

__all__ = ["progress_bar"]


def progress_bar(total: int, enabled: bool, desc: str):
    """A tqdm bar of ``total`` steps, or None when disabled, when tqdm (an optional extra) is
    missing, or when the output is not a terminal (a log file or CI would get a line per update)."""
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # tqdm is optional
        return None
    bar = tqdm(total=total, desc=desc, leave=False, disable=None)  # disable=None: off when not a TTY
    if bar.disable:
        bar.close()
        return None
    return bar
