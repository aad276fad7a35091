"""Storage of the local Hub-compatible server: content-addressed blobs, one record per commit.

Layout under the root folder::

    blobs/<sha256>                                   file contents, content-addressed
    repos/<type>s/<namespace>/<name>/repo.yaml       settings, owner, branches, tags, pull requests
    repos/<type>s/<namespace>/<name>/commits/<oid>.yaml   one record per commit (tree + message)

Every mutation writes its record atomically (temporary file + rename) under a
lock, and a commit becomes visible only once all its blobs are stored: a failed
or interrupted commit leaves no trace but unreferenced blobs. Paths in a commit
must stay inside the repository (:func:`check_path`), and LFS uploads are
streamed to disk under :attr:`Store.max_upload_bytes` (see :mod:`.blobs`).
The records themselves (repository, commit, file) are in :mod:`.records`.
Standard library and PyYAML only.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

import yaml

from .blobs import DEFAULT_MAX_UPLOAD_BYTES, BlobStore, StoreError
from .records import (  # noqa: F401  (the routes import these names from here)
    COMMIT_RE, GATED_VALUES, GITATTRIBUTES, LFS_SUFFIXES, NAME_RE, PR_REF_RE, REPO_TYPES, Commit, FileEntry, Repo,
    check_path, git_blob_oid, now,
)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


class Store:
    """Repositories, commits, blobs and users of one local Hub."""

    def __init__(
        self,
        root: str | Path,
        *,
        users: dict[str, str],
        orgs: dict[str, list[str]] | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
    ):
        self.root = Path(root)
        self.blobs = BlobStore(self.root / "blobs")
        self.blob_dir = self.blobs.folder
        #: the largest object one LFS upload may store (413 beyond); read at each request
        self.max_upload_bytes = max_upload_bytes
        self.users = dict(users)  # token -> user name
        self.orgs = {org: list(members) for org, members in (orgs or {}).items()}
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self._load()

    # ------------------------------------------------------------------ users
    def user_for(self, token: str | None) -> str | None:
        return self.users.get(token) if token else None

    def can_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or user in self.orgs.get(namespace, []))

    def can_read(self, user: str | None, repo: Repo) -> bool:
        return not repo.private or self.can_write(user, repo.namespace)

    # ------------------------------------------------------------------ blobs
    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        return self.blobs.has(sha256, size)

    def read_blob(self, sha256: str) -> bytes:
        return self.blobs.read(sha256)

    # ------------------------------------------------------------------ repos
    def _repo_dir(self, repo: Repo) -> Path:
        return self.root / "repos" / f"{repo.type}s" / repo.id

    def get(self, repo_type: str, repo_id: str, user: str | None) -> Repo:
        """The repository, or 404 ``RepoNotFound`` (also for private repositories of others)."""
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or not self.can_read(user, repo):
            raise StoreError(404, "Repository not found", "RepoNotFound")
        return repo

    def create_repo(self, repo_type: str, repo_id: str, owner: str, private: bool) -> tuple[Repo, bool]:
        with self.lock:
            existing = self.repos.get((repo_type, repo_id))
            if existing is not None:
                return existing, False
            repo = Repo(repo_type, repo_id, private, owner, now())
            self.repos[(repo_type, repo_id)] = repo
            data = GITATTRIBUTES.encode()
            self.commit(repo, "main", owner, "initial commit", "", {".gitattributes": self._entry(".gitattributes", data, False)}, [], None)
            return repo, True

    def delete_repo(self, repo: Repo) -> None:
        import shutil

        with self.lock:
            self.repos.pop((repo.type, repo.id), None)
            shutil.rmtree(self._repo_dir(repo), ignore_errors=True)

    def _entry(self, path: str, data: bytes, lfs: bool) -> FileEntry:
        sha = self.blobs.put(data)
        return FileEntry(path, sha, len(data), git_blob_oid(data), lfs)

    def regular_entry(self, path: str, data: bytes) -> FileEntry:
        return self._entry(path, data, False)

    def has_lfs(self, repo: Repo, sha256: str, size: int) -> bool:
        return sha256 in repo.lfs_objects and self.has_blob(sha256, size)

    def put_lfs(self, repo: Repo, chunks: Iterable[bytes], sha256: str, size: int | None = None) -> None:
        """Stream an LFS object of ``repo`` to disk (capped at :attr:`max_upload_bytes`, checked against its
        sha256 and, when given, its announced size); it counts as uploaded only once complete."""
        self.blobs.put_chunks(chunks, sha256, size=size, limit=self.max_upload_bytes)
        with self.lock:
            repo.lfs_objects.add(sha256)
            self.save(repo)

    def lfs_entry(self, repo: Repo, path: str, sha256: str, size: int | None) -> FileEntry:
        """The entry of an LFS file whose object was uploaded to ``repo``; ``size=None`` (a copy of a file of the
        repository, whose commit line names only the oid) takes the stored object's size."""
        if size is None and sha256 in repo.lfs_objects and self.has_blob(sha256):
            size = self.blobs.path(sha256).stat().st_size
        if size is None or not self.has_lfs(repo, sha256, size):
            raise StoreError(422, f"LFS object {sha256} of {path} was not uploaded (or has another size)")
        # the git oid of an LFS file is that of its pointer file, as on the Hub
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
        return FileEntry(path, sha256, size, git_blob_oid(pointer), True)

    def commit(
        self,
        repo: Repo,
        branch: str,
        author: str,
        title: str,
        message: str,
        added: dict[str, FileEntry],
        deleted: list[str],
        parent: str | None,
        *,
        target: str | None = None,
    ) -> Commit:
        """Create a commit on ``branch`` (a branch or ``refs/pr/<n>``) atomically; ``parent`` (if given) must be its
        head (else 412). ``target``: the ref the commit lands on instead (a new pull request's ref)."""
        for path in added:
            check_path(path)
        for path in deleted:
            check_path(path, folder=True)
        with self.lock:
            head = repo.ref_head(branch)
            if head is None and repo.commits:
                raise StoreError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            if parent is not None and parent != head:
                raise StoreError(412, f"A commit has happened since: {parent} is not the head of {branch}")
            files = dict(repo.commits[head].files) if head else {}
            for path in deleted:
                prefix = path.rstrip("/") + "/"
                if path not in files and not any(p.startswith(prefix) for p in files):
                    raise StoreError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                files = {p: e for p, e in files.items() if p != path and not p.startswith(prefix)}
            files.update(added)
            date = now()
            record = {"parents": [head] if head else [], "title": title, "message": message, "author": author,
                      "date": date, "files": {p: files[p].as_dict() for p in sorted(files)}}
            oid = hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()
            commit = Commit(oid, record["parents"], title, message, author, date, files)
            _write_atomic(self._repo_dir(repo) / "commits" / f"{oid}.yaml", yaml.safe_dump(record, sort_keys=True))
            repo.commits[oid] = commit
            repo.set_ref(target or branch, oid)
            self.save(repo)
            return commit

    def save(self, repo: Repo) -> None:
        data = {"type": repo.type, "id": repo.id, "private": repo.private, "owner": repo.owner,
                "created_at": repo.created_at, "branches": repo.branches, "tags": repo.tags,
                "lfs_objects": sorted(repo.lfs_objects), "gated": repo.gated,
                "pull_requests": {int(n): oid for n, oid in repo.pull_requests.items()}}
        _write_atomic(self._repo_dir(repo) / "repo.yaml", yaml.safe_dump(data, sort_keys=True))

    def _load(self) -> None:
        for record in sorted((self.root / "repos").glob("*/*/*/repo.yaml")):
            data = yaml.safe_load(record.read_text())
            repo = Repo(data["type"], data["id"], data["private"], data["owner"], data["created_at"],
                        data.get("branches", {}), data.get("tags", {}), lfs_objects=set(data.get("lfs_objects", [])),
                        pull_requests={int(n): oid for n, oid in (data.get("pull_requests") or {}).items()},
                        gated=data.get("gated", False))
            for path in (record.parent / "commits").glob("*.yaml"):
                c = yaml.safe_load(path.read_text())
                files = {p: FileEntry(p, e["sha256"], e["size"], e["git_oid"], e["lfs"]) for p, e in c["files"].items()}
                repo.commits[path.stem] = Commit(path.stem, c["parents"], c["title"], c["message"], c["author"], c["date"], files)
            self.repos[(repo.type, repo.id)] = repo
