"""Checkpoint files that survive crashes and concurrent readers.

    save_checkpoint(state, path)     torch.save to a uniquely named temporary file beside `path`, flushed to
                                     disk, then renamed over `path`; the checkpoint it replaces is kept as
                                     `path`.prev until the next save (a reader never sees a half-written file)
    load_checkpoint(path)            the state at `path`; if that file is missing or corrupt (a crash while
                                     writing it, a truncated copy), the previous one, with a one-line notice
"""
from __future__ import annotations

import os
import secrets
from typing import Callable, Optional, Tuple

import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "previous_path"]


class CheckpointError(RuntimeError):
    """No usable checkpoint: missing, or corrupt with no usable previous one."""


def previous_path(path: str) -> str:
    return f"{path}.prev"


def save_checkpoint(state, path: str, *, keep_previous: bool = True) -> None:
    """Writes `state` to `path` atomically (see the module docstring)."""
    tmp = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.tmp"  # unique: concurrent writers never share it
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous:
            _keep_previous(path)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _keep_previous(path: str) -> None:
    """Makes the current `path` the previous checkpoint while `path` itself stays in place (a hard link
    renamed over .prev), so a reader always finds a complete `path`."""
    link = f"{path}.{os.getpid()}.{secrets.token_hex(4)}.link"
    try:
        os.link(path, link)
    except FileNotFoundError:
        return  # the first checkpoint
    except OSError:  # a file system without hard links: rename (a reader may then briefly miss `path`)
        try:
            os.replace(path, previous_path(path))
        except FileNotFoundError:
            pass
        return
    os.replace(link, previous_path(path))


def _load(path: str, map_location):
    return torch.load(path, map_location=map_location, weights_only=False)


def load_checkpoint(path: str, *, map_location="cpu", log: Optional[Callable[[str], None]] = print
                    ) -> Tuple[object, str]:
    """(state, the file it came from): `path`, or its previous checkpoint when `path` is missing or corrupt
    (saying so in one line through `log`). Raises CheckpointError when neither loads."""
    prev = previous_path(path)
    try:
        return _load(path, map_location), path
    except FileNotFoundError:
        if not os.path.exists(prev):
            raise CheckpointError(f"no checkpoint at {path}") from None
        reason = "it is missing"
    except Exception as e:  # a truncated or zero-byte file: EOFError, zip or unpickling errors
        reason = f"it is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no detail'})"
        if not os.path.exists(prev):
            raise CheckpointError(f"the checkpoint {path} cannot be read: {reason[6:]}; there is no previous "
                                  f"checkpoint ({prev}) to fall back to") from None
    try:
        state = _load(prev, map_location)
    except Exception as e:
        raise CheckpointError(f"the checkpoint {path} cannot be used ({reason}), and neither can the previous "
                              f"one {prev} ({type(e).__name__})") from None
    if log is not None:
        log(f"warning: {path} cannot be used ({reason}); using the previous checkpoint {prev}")
    return state, prev
