"""Atomic output folders: a folder either appears complete or not at all.

Files are written into a hidden sibling ``.<name>.erasepro-tmp-<random>`` and the
folder is renamed into place only when every file is written and synced. A
process killed mid-write leaves at most that hidden temporary folder, never a
folder at the requested path that looks complete. With ``overwrite`` the old
folder is first renamed aside, then removed once the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import OutputExistsError, UnsafePathError

TMP_MARK = ".erasepro-tmp-"


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


@contextmanager
def atomic_folder(path: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder; on success it becomes ``path`` atomically, on error it is removed."""
    path = check_output(path, overwrite=overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        os.chmod(tmp, 0o755)
        if path.exists():
            check_output(path, overwrite=overwrite)
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.erasepro-old-", dir=path.parent))
            os.rmdir(old)
            os.rename(path, old)
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
