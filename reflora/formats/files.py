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

An overwritten file keeps its permission bits: the temporary file gets them before any data is
written, so the new content is never readable by more users than the old. A new file gets those
``open`` would give it (0o666 less the umask).
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import stat
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

    Every target's directory must exist; a missing one raises FileNotFoundError naming the target.
    An existing target keeps its permission bits; a new one gets 0o666 less the umask.
    """
    staged: list[tuple[Path, Path]] = []  # (target, temporary file)
    kept: dict[Path, Path | None] = {}  # target -> its old content, None where it had none
    done: list[Path] = []
    try:
        for target, data in files.items():
            target = Path(target)
            mode = stat.S_IMODE(os.stat(target).st_mode) if target.exists() else None
            tmp = _beside(target, "tmp")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            try:
                # private until it has the old file's bits, so its data is never more widely readable
                fd = os.open(tmp, flags, 0o666 if mode is None else 0o600)
            except FileNotFoundError as e:
                if target.parent.is_dir():  # it exists but takes no new files (/proc): say that instead
                    raise OSError(
                        e.errno, f"cannot create a file in {str(target.parent)!r}: {e.strerror}", str(target)
                    ) from None
                raise FileNotFoundError(
                    errno.ENOENT, f"the directory {str(target.parent)!r} does not exist", str(target)
                ) from None
            staged.append((target, tmp))
            with os.fdopen(fd, "wb") as f:
                if mode is not None:
                    os.chmod(tmp, mode)
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
