"""Durable files: atomic replacement, synced appends, and JSON lines that survive a torn last line.

A run is resumed from what is on disk, so every file it depends on is either whole or absent: written
under a temporary name, fsynced, renamed into place, and its directory fsynced (a rename is only
durable once the directory entry is). Appends are flushed and fsynced per call. A kill during an
append can still leave half a line at the end of a JSON-lines file: readers drop it with a warning.
Imports nothing from attnrl_core.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import warnings
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` so that a kill at any moment leaves the old or the new file, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def append_jsonl(path: str | Path, rows: list[dict]) -> None:
    """Append one JSON line per row, in one write, flushed to disk."""
    with open(path, "a") as fh:
        fh.write("".join(json.dumps(row) + "\n" for row in rows))
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file ([] when absent). A torn last line (a kill during an append) is
    dropped with a warning; a malformed line anywhere else is an error naming the file and line."""
    path = Path(path)
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line:
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # no newline after it: the last append did not finish
                warnings.warn(f"{path}: dropping a torn last line (the run was killed while logging)",
                              stacklevel=2)
                continue
            raise ValueError(f"{path} line {i + 1} is not valid JSON: the file is damaged; restore it or "
                             f"delete the line") from None
    return rows


def truncate_jsonl(path: str | Path, last_episode: int) -> None:
    """Keep only rows of episodes <= last_episode (logs written after a checkpoint are redone), atomically."""
    path = Path(path)
    if path.exists():
        rows = [r for r in read_jsonl(path) if r["episode"] <= last_episode]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


_RENAME_EXCHANGE = 2  # <linux/fs.h>
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot exchange {a} and {b}")


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing a folder already there without a moment in
    which `final` is missing (an exchange, then the old copy is removed); the parent is fsynced."""
    if not final.exists():
        os.rename(tmp, final)
    elif _exchange(tmp, final):
        shutil.rmtree(tmp)  # now the old copy
    else:  # no atomic exchange on this system: the old copy is gone for a moment
        shutil.rmtree(final)
        os.rename(tmp, final)
    fsync_dir(final.parent)
