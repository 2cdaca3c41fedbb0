"""Writing a set of files all or none.

A checkpoint or an adapter overwritten in place is lost if the write stops halfway (a full disk, an
interrupt), and a pair of files written one after the other (weights, then their config) can end up
from two different saves. :func:`write_files` therefore

1. writes every file to a temporary name beside its target and flushes it to disk;
2. keeps each existing target's old content under a second name (a hard link, or a copy where the
   file system has none);
3. renames each temporary file over its target (``os.replace``, atomic within one file system);
   if one rename fails, the targets already replaced get their old content back the same way;
4. removes the old copies.

An error at any step leaves every target as it was, and no temporary file behind. Only a process
killed between two renames of step 3 can leave a mix; each file is whole even then.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = ["write_files"]


def _beside(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(4)}.{tag}")


def _keep_old(target: Path) -> Path | None:
    """A second name holding ``target``'s current content, or None if there is no target."""
    if not target.exists():
        return None
    old = _beside(target, "old")
    try:
        os.link(target, old)
    except OSError:  # no hard links here (some network or FAT file systems)
        shutil.copy2(target, old)
    return old


def write_files(files: Mapping[str | os.PathLike, bytes]) -> None:
    """Write each ``target: data`` pair, all or none of them (module docstring).

    Every target's directory must exist. New files get the permissions ``open`` would give them
    (0o666 less the umask).
    """
    staged: list[tuple[Path, Path]] = []  # (target, temporary file)
    kept: dict[Path, Path | None] = {}  # target -> its old content, None where it had none
    done: list[Path] = []
    try:
        for target, data in files.items():
            target = Path(target)
            tmp = _beside(target, "tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            staged.append((target, tmp))
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        for target, _ in staged:
            kept[target] = _keep_old(target)
        for target, tmp in staged:
            os.replace(tmp, target)
            done.append(target)
    except BaseException:
        for target in reversed(done):  # undo: the old content back, or no file where there was none
            old = kept[target]
            if old is None:
                target.unlink(missing_ok=True)
            else:
                os.replace(old, target)
        raise
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)  # gone already where the rename happened
        for old in kept.values():
            if old is not None:
                old.unlink(missing_ok=True)  # gone already where it was put back
