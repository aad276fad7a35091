"""Atomic output folders: an overwrite never leaves the path empty, and one writer at a time."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from erasepro_hub import fsutil
from erasepro_hub.errors import EraseProError

FILES = ("adapter.bin", "erasepro.yaml", "README.md")


def fill(folder: Path, tag: str) -> None:
    for name in FILES:
        (folder / name).write_text(f"{tag}\n")


def state(folder: Path) -> str | None:
    """``tag`` when ``folder`` is a complete folder written by ``fill(folder, tag)``; else ``None``."""
    try:
        names = sorted(p.name for p in folder.iterdir())
    except FileNotFoundError:
        return None
    if names != sorted(FILES):
        return None
    tags = {(folder / name).read_text() for name in FILES}
    return tags.pop().strip() if len(tags) == 1 else None


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name != "out")


@pytest.fixture
def out(tmp_path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    fill(folder, "old")
    return folder


def can_exchange(parent: Path) -> bool:
    """Whether ``renameat2(RENAME_EXCHANGE)`` works here (Linux, a recent libc, a file system that has it)."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    a, b = parent / "probe-a", parent / "probe-b"
    a.mkdir(), b.mkdir()
    try:
        return renameat2(-100, os.fsencode(a), -100, os.fsencode(b), 2) == 0
    finally:
        a.rmdir(), b.rmdir()


def watch(monkeypatch, step) -> None:
    """Call ``step(name)`` before and after every step that renames, exchanges or removes a folder."""

    def wrap(name, function):
        def wrapper(*args, **kwargs):
            step(f"before {name}")
            result = function(*args, **kwargs)
            step(f"after {name}")
            return result

        return wrapper

    monkeypatch.setattr(os, "rename", wrap("rename", os.rename))
    monkeypatch.setattr(os, "replace", wrap("replace", os.replace))
    monkeypatch.setattr(os, "rmdir", wrap("rmdir", os.rmdir))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree", shutil.rmtree))
    if hasattr(fsutil, "exchange"):
        monkeypatch.setattr(fsutil, "exchange", wrap("exchange", fsutil.exchange))


def test_overwrite_keeps_a_complete_folder_at_the_path_at_every_step(out, tmp_path, monkeypatch):
    if not can_exchange(tmp_path):
        pytest.skip("this system or file system cannot exchange two paths atomically (the fallback is two renames)")
    seen = []

    def step(name):
        seen.append((name, state(out)))
        assert state(out) in ("old", "new"), f"{out} is not a complete folder {name}"

    watch(monkeypatch, step)
    with fsutil.atomic_folder(out, overwrite=True) as tmp:
        fill(tmp, "new")
        step("while writing")
    assert state(out) == "new"
    assert [s for _, s in seen if s == "new"], seen  # the steps were watched
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["exchange", "two-renames"])
def test_a_failed_replace_leaves_the_complete_old_folder_and_nothing_else(out, tmp_path, monkeypatch, how):
    def boom(*args, **kwargs):
        raise OSError(5, "simulated I/O error")

    if how == "exchange":
        monkeypatch.setattr(fsutil, "exchange", boom, raising=False)
    else:  # a system without the exchange: the second of the two renames fails
        monkeypatch.setattr(fsutil, "exchange", lambda a, b: False, raising=False)
        real, calls = os.rename, []

        def rename(src, dst):
            calls.append((src, dst))
            if len(calls) == 2:
                boom()
            return real(src, dst)

        monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="simulated"):
        with fsutil.atomic_folder(out, overwrite=True) as tmp:
            fill(tmp, "new")
    assert state(out) == "old"
    assert leftovers(tmp_path) == []  # no temporary, -old- or lock file


def test_a_second_writer_fails_fast_while_the_first_writes(out, tmp_path):
    entered, release, errors = threading.Event(), threading.Event(), []

    def first():
        try:
            with fsutil.atomic_folder(out, overwrite=True) as tmp:
                fill(tmp, "first")
                entered.set()
                assert release.wait(30)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
            entered.set()

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert entered.wait(30)
        start = time.monotonic()
        with pytest.raises(EraseProError, match="another erasepro process is writing") as caught:
            with fsutil.atomic_folder(out, overwrite=True) as tmp:
                fill(tmp, "second")
        assert time.monotonic() - start < 5  # at once, not after the first is done
        assert caught.value.exit_code == 2
        assert state(out) == "old"  # the first writer is still writing
    finally:
        release.set()
        thread.join(30)
    assert not errors, errors
    assert state(out) == "first"
    assert leftovers(tmp_path) == []  # the lock file is gone too


def test_a_writer_arriving_during_the_swap_fails_fast_and_the_first_completes(out, tmp_path, monkeypatch):
    second: list[BaseException | None] = []
    started = []

    def step(name):
        if started or name not in ("after rename", "after replace", "after exchange"):
            return
        started.append(name)
        try:  # another writer of the same path, right after the first's first renaming step
            with fsutil.atomic_folder(out, overwrite=True) as tmp:
                fill(tmp, "second")
            second.append(None)
        except BaseException as exc:
            second.append(exc)

    with fsutil.atomic_folder(out, overwrite=True) as tmp:
        fill(tmp, "first")
        watch(monkeypatch, step)
    monkeypatch.undo()
    assert second and isinstance(second[0], EraseProError) and second[0].exit_code == 2, second
    assert state(out) == "first"
    assert leftovers(tmp_path) == []  # no .out.erasepro-old-* or temporary folder leaked


def test_replacing_swaps_in_a_whole_file_or_leaves_the_old_one(tmp_path):
    from erasepro_hub.fsutil import replacing

    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="cut"):
        with replacing(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("cut")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with replacing(path) as tmp:
        tmp.write_bytes(b"new")
    assert path.read_bytes() == b"new" and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]
    with pytest.raises(FileNotFoundError, match="the folder .*missing does not exist"):
        with replacing(tmp_path / "missing" / "b.bin"):
            pass
    assert not (tmp_path / "missing").exists()
