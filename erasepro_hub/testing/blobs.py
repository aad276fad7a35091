"""Content-addressed blob storage of the local Hub-compatible server.

``<folder>/<sha256>`` holds the bytes whose sha256 is the name. A blob appears only
complete and checked: it is written to a temporary file in the same folder and
renamed into place. Uploads are streamed in chunks — never held whole in memory —
under a size cap, and a refused or interrupted upload removes its temporary file.
Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: Default cap on one uploaded object (LFS upload). The demo server's ``--max-upload-mb`` changes it;
#: tests lower ``Store.max_upload_bytes`` to exercise the refusal.
DEFAULT_MAX_UPLOAD_BYTES = 512 * 1024 * 1024
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class StoreError(Exception):
    """An error with an HTTP status and the Hub's ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class BlobStore:
    """Blobs named by their sha256, in one folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
            raise StoreError(400, f"invalid sha256 {sha256!r}")
        return self.folder / sha256

    def has(self, sha256: str, size: int | None = None) -> bool:
        if not isinstance(sha256, str) or not SHA256_RE.match(sha256):
            return False
        path = self.folder / sha256
        return path.exists() and (size is None or path.stat().st_size == size)

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def put(self, data: bytes) -> str:
        """Store bytes already in memory (regular files, sent inline in a commit); returns their sha256."""
        sha = hashlib.sha256(data).hexdigest()
        return self.put_chunks([data], sha, size=len(data), limit=len(data))

    def put_chunks(self, chunks: Iterable[bytes], sha256: str, *, size: int | None, limit: int) -> str:
        """Stream ``chunks`` to disk as blob ``sha256``.

        More than ``limit`` bytes → 413, as soon as the limit is passed; a total other than ``size`` (when
        given) or content that does not hash to ``sha256`` → 400. On any failure, including the client
        going away mid-stream, nothing is left behind.
        """
        target = self.path(sha256)
        digest, total = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    total += len(chunk)
                    if total > limit:
                        raise StoreError(
                            413, f"upload too large: more than {limit} bytes, the limit of this Hub for one object"
                        )
                    digest.update(chunk)
                    handle.write(chunk)
            if size is not None and total != size:
                raise StoreError(400, f"received {total} bytes for {sha256}, announced {size}")
            actual = digest.hexdigest()
            if actual != sha256:
                raise StoreError(400, f"content hash {actual} does not match the announced oid {sha256}")
            os.replace(tmp, target)  # same bytes if the blob already exists
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        return sha256
