"""reflora.formats.files.write_files: every file whole or none, nothing left behind, permissions kept.

save_adapter and save_4bit_checkpoint go through it; the interrupted-save test below runs against
save_adapter so that the guarantee is checked where users meet it.
"""

from __future__ import annotations

import os
import stat

import pytest

from reflora.formats import files
from reflora.formats.files import write_files


def test_writes_every_file_and_replaces_old_content(tmp_path) -> None:
    (tmp_path / "a").write_bytes(b"old a")
    write_files({tmp_path / "a": b"new a", str(tmp_path / "b"): b""})
    assert (tmp_path / "a").read_bytes() == b"new a" and (tmp_path / "b").read_bytes() == b""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_failure_before_the_renames_changes_no_target(tmp_path) -> None:
    (tmp_path / "a").write_bytes(b"old a")
    with pytest.raises(FileNotFoundError):
        write_files({tmp_path / "a": b"new a", tmp_path / "missing" / "b": b"b"})
    assert (tmp_path / "a").read_bytes() == b"old a"
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no temporary file left


def test_a_missing_directory_is_named_with_the_target(tmp_path) -> None:
    target = tmp_path / "missing" / "x.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist") as info:
        write_files({target: b"x"})
    assert info.value.filename == str(target) and ".tmp" not in str(info.value)


def test_a_directory_that_exists_but_takes_no_file_is_not_called_missing(tmp_path, monkeypatch) -> None:
    """/proc exists and refuses new files with ENOENT: the error says so, naming the target."""
    import errno
    import os

    real = os.open

    def refuses(path, flags, mode=0o777):
        if str(path).startswith(str(tmp_path / "proc")):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(path))
        return real(path, flags, mode)

    (tmp_path / "proc").mkdir()
    monkeypatch.setattr(os, "open", refuses)
    target = tmp_path / "proc" / "x.json"
    with pytest.raises(OSError, match=r"cannot create a file in .*proc.*: No such file or directory") as info:
        write_files({target: b"x"})
    assert "does not exist" not in str(info.value) and info.value.filename == str(target)


def test_an_interrupted_write_changes_no_target(tmp_path, monkeypatch) -> None:
    (tmp_path / "a").write_bytes(b"old a")
    (tmp_path / "b").write_bytes(b"old b")
    calls = []

    def fsync(fd: int) -> None:  # the second file's flush is interrupted, after the first is staged
        calls.append(fd)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "fsync", fsync)
    with pytest.raises(KeyboardInterrupt):
        write_files({tmp_path / "a": b"new a", tmp_path / "b": b"new b"})
    assert (tmp_path / "a").read_bytes() == b"old a" and (tmp_path / "b").read_bytes() == b"old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_files_get_the_umask_permissions(tmp_path) -> None:
    old = os.umask(0o027)
    try:
        write_files({tmp_path / "a": b"x"})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o640


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_an_overwritten_file_keeps_its_permissions(tmp_path, monkeypatch) -> None:
    for name, mode in [("private", 0o600), ("group", 0o640), ("open", 0o666), ("exec", 0o750)]:
        (tmp_path / name).write_bytes(b"old")
        (tmp_path / name).chmod(mode)
    modes_at_flush = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the new data must never be more widely readable than the old
        modes_at_flush.append(stat.S_IMODE(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    old = os.umask(0o022)
    try:
        write_files({tmp_path / n: b"new" for n in ["private", "group", "open", "exec", "new"]})
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"private": 0o600, "group": 0o640, "open": 0o666, "exec": 0o750, "new": 0o644}
    assert modes_at_flush == [0o600, 0o640, 0o666, 0o750, 0o644]


def test_an_interrupted_adapter_save_keeps_the_old_adapter(tmp_path, monkeypatch) -> None:
    torch = pytest.importorskip("torch")
    from reflora.backends.torch.adapters import save_adapter
    from reflora.backends.torch.modules import apply_lora

    def model(r: int) -> torch.nn.Module:
        return apply_lora(torch.nn.Sequential(torch.nn.Linear(8, 4)), r, 2 * r, ["0"], verbose=False)

    save_adapter(model(2), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["adapter_config.json", "adapter_model.safetensors"]
    real_replace = os.replace

    def replace(src, dst) -> None:  # the config's rename fails after the weights' has been staged
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model(4), tmp_path)
    monkeypatch.undo()
    # The weights had already been replaced when the config's rename failed: they are put back.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_failed_rename_undoes_the_ones_before_it(tmp_path, monkeypatch) -> None:
    (tmp_path / "a").write_bytes(b"old a")
    real_replace = os.replace

    def replace(src, dst) -> None:
        if str(dst).endswith("c") and str(src).endswith(".tmp"):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        write_files({tmp_path / "a": b"new a", tmp_path / "b": b"new b", tmp_path / "c": b"new c"})
    # a has its old content again, b (new) is gone again, c never came; nothing else is left.
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("a", b"old a")]


def test_without_hard_links_the_old_content_is_copied(tmp_path, monkeypatch) -> None:
    (tmp_path / "a").write_bytes(b"old a")

    def link(src, dst) -> None:
        raise OSError("no hard links on this file system")

    monkeypatch.setattr(files.os, "link", link)
    write_files({tmp_path / "a": b"new a"})
    assert [(p.name, p.read_bytes()) for p in tmp_path.iterdir()] == [("a", b"new a")]
