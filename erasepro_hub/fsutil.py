"""Atomic output folders: a folder either appears complete or not at all.

Files are written into a hidden sibling ``.<name>.erasepro-tmp-<random>`` and the
folder is moved into place only when every file is written and synced. A process
killed mid-write leaves at most that hidden temporary folder, never a folder at the
requested path that looks complete.

With ``overwrite``, an existing folder is *exchanged* with the new one in one step
(Linux ``renameat2(RENAME_EXCHANGE)``), so the path holds the complete old folder or
the complete new one at every instant; the old one, now under the temporary name,
is removed afterwards. Where the system has no such call, two renames are the
fallback (see :func:`atomic_folder`).

While a folder is written, the lock file ``.<name>.erasepro-tmp-lock`` next to it is
held (``flock``, non-blocking): a second writer of the same path fails at once with
:class:`~erasepro_hub.errors.OutputBusyError` (exit code 2) instead of racing the first.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputBusyError, OutputExistsError, UnsafePathError

TMP_MARK = ".erasepro-tmp-"
OLD_MARK = ".erasepro-old-"
#: the lock file is named like the temporary folders: all that a killed writer can leave is ``.<name>.erasepro-tmp-*``
LOCK_MARK = ".erasepro-tmp-lock"

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
#: errors that mean "this system or file system cannot do it", not "it went wrong"
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def check_output(path: str | Path, *, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; refuse a path that is a file."""
    path = Path(path)
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise UnsafePathError(f"output {path} exists and is not a folder; choose another --out")
        if not overwrite:
            raise OutputExistsError(f"output folder {path} already exists; pass --overwrite to replace it")
    return path


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - a system that cannot open folders (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some file systems refuse fsync on a folder
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- renameat2
def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # a libc without it (glibc < 2.28)
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_renameat2 = _load_renameat2()


def _rename2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; ``False`` where the system or file system does not support it."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def exchange(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step; ``False`` (nothing done) where the system cannot.

    Linux ``renameat2(RENAME_EXCHANGE)`` (kernel 3.15, glibc 2.28; most local file systems).
    """
    return _rename2(Path(a), Path(b), _RENAME_EXCHANGE)


def _move_new(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, which must not exist (an existing ``dst`` is never replaced)."""
    appeared = f"output folder {dst} appeared while it was written; pass --overwrite to replace it"
    try:
        if _rename2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise OutputExistsError(appeared) from None
    if dst.exists() or dst.is_symlink():  # fallback: a check, then a rename
        raise OutputExistsError(appeared)
    os.rename(src, dst)


def _replace(new: Path, path: Path) -> None:
    """Put the folder ``new`` at ``path`` in place of the folder there, and remove the old one.

    One exchange where the system has it: ``path`` always holds a complete folder. The fallback
    renames the old folder aside, renames the new one into place (putting the old one back if that
    fails) and removes the old one.
    """
    if exchange(new, path):
        # ``new`` now names the old folder; ``path`` the new one
        _fsync_dir(path.parent)
        shutil.rmtree(new, ignore_errors=True)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}{OLD_MARK}", dir=path.parent))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(old, path)
        raise
    _fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- one file
@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """A new file's path beside ``path`` (``.<name>.<pid>.tmp``) to write in the ``with`` block; it then replaces
    ``path`` in one rename. If the block fails, the new file is removed and ``path`` is as it was (a cleanup that
    itself fails does not hide the block's error)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: the folder {path.parent} does not exist (create it first)")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass


# --------------------------------------------------------------------------- lock
def lock_path(path: str | Path) -> Path:
    """The lock file of output ``path``: ``.<name>.erasepro-tmp-lock`` next to it."""
    path = Path(path).absolute()
    return path.parent / f".{path.name}{LOCK_MARK}"


@contextmanager
def output_lock(path: str | Path) -> Iterator[Path]:
    """Hold the lock of output ``path`` (non-blocking); :class:`OutputBusyError` if another process holds it.

    The lock is ``flock`` on ``.<name>.erasepro-tmp-lock`` next to ``path``; the lock file is removed
    when the lock is released. The lock dies with its process, so a killed writer never leaves a
    stale lock behind (at most the empty lock file, which the next writer takes over). Without
    ``fcntl`` (Windows) there is no lock.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield lock_path(path)
        return
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise OutputBusyError(
                f"another erasepro process is writing {Path(path)} (it holds {lock.name}); "
                "wait for it to finish, or choose another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        # the holder before us may have removed the file after we opened it: lock the file at the path
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield lock
    finally:
        try:
            os.unlink(lock)  # while still held, so no one can lock this file after it is gone
        except FileNotFoundError:  # pragma: no cover
            pass
        finally:
            os.close(fd)


# --------------------------------------------------------------------------- the folder
@contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``path`` atomically, on error it is removed.

    The lock of ``path`` (:func:`output_lock`) is held from start to end: a concurrent writer of the
    same path gets :class:`OutputBusyError` (exit code 2) at once. A new folder is renamed into place
    only if nothing has appeared at ``path`` meanwhile (``RENAME_NOREPLACE`` where available).

    With ``overwrite``, an existing folder is exchanged with the new one in one atomic step
    (``renameat2(RENAME_EXCHANGE)`` on Linux): at every instant ``path`` is the complete old folder or
    the complete new one. The old folder is then removed. *Fallback* on systems without that call
    (not Linux, an old libc, a file system that refuses it): two renames, the old folder aside to
    ``.<name>.erasepro-old-<random>`` and the new one into place (the old one is put back if the
    second rename fails). Between those renames there is no folder at ``path``, and a process killed
    there leaves the old folder under the ``-old-`` name; the lock still keeps other erasepro writers out.

    On any failure the temporary folder is removed and the lock released; nothing is left behind.
    """
    path = check_output(path, overwrite=overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    with output_lock(path):
        check_output(path, overwrite=overwrite)  # again, now that no other erasepro writer can change it
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
        try:
            yield tmp
            _fsync_tree(tmp)
            os.chmod(tmp, 0o755)
            if path.exists() or path.is_symlink():
                check_output(path, overwrite=overwrite)
                _replace(tmp, path)
            else:
                _move_new(tmp, path)
                _fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
