"""Storage of the local Hub-compatible server: content-addressed blobs, one record per commit.

Layout under the root folder::

    blobs/<sha256>                                   file contents, content-addressed
    repos/<type>s/<namespace>/<name>/repo.yaml       visibility, owner, branches, tags
    repos/<type>s/<namespace>/<name>/commits/<oid>.yaml   one record per commit (tree + message)

Every mutation writes its record atomically (temporary file + rename) under a
lock, and a commit becomes visible only once all its blobs are stored: a failed
or interrupted commit leaves no trace but unreferenced blobs. Paths in a commit
must stay inside the repository (:func:`check_path`), and LFS uploads are
streamed to disk under :attr:`Store.max_upload_bytes` (see :mod:`.blobs`).
Standard library and PyYAML only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .blobs import DEFAULT_MAX_UPLOAD_BYTES, BlobStore, StoreError

REPO_TYPES = ("model", "dataset", "space")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
#: Paths stored with Git LFS (besides binary samples and files of 10 MB or more).
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".png", ".jpg", ".jpeg", ".webp", ".gz", ".zip", ".npz")
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as ``oid`` for regular files)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def check_path(path: object, *, folder: bool = False) -> str:
    """A file path of a commit, or :class:`StoreError` 400 naming it: as on the Hub, a path is relative and
    stays inside the repository — no leading ``/``, no empty, ``.`` or ``..`` segment, no ``.git`` folder,
    no backslash, NUL or other control character. ``folder``: one trailing ``/`` is allowed (folder deletion)."""
    if not isinstance(path, str):
        raise StoreError(400, f"Invalid path {path!r}: a path must be a string")
    rest = path[:-1] if folder and path.endswith("/") and path != "/" else path
    segments = rest.split("/")
    if not rest:
        reason = "the path is empty"
    elif any(ord(c) < 32 or c == "\x7f" for c in path):
        reason = "it contains a NUL or control character"
    elif "\\" in path:
        reason = "it contains a backslash"
    elif path.startswith("/"):
        reason = "it is absolute"
    elif "" in segments:
        reason = "it has an empty segment"
    elif "." in segments or ".." in segments:
        reason = "it has a '.' or '..' segment"
    elif ".git" in segments:
        reason = "it is inside a .git folder"
    else:
        return path
    raise StoreError(400, f"Invalid path {path!r}: {reason}; paths are relative and stay inside the repository")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.replace(tmp, path)


@dataclass
class FileEntry:
    path: str
    sha256: str
    size: int
    git_oid: str
    lfs: bool

    def as_dict(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "git_oid": self.git_oid, "lfs": self.lfs}


@dataclass
class Commit:
    oid: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    files: dict[str, FileEntry]


@dataclass
class Repo:
    type: str
    id: str
    private: bool
    owner: str
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    #: LFS objects uploaded to this repository (as on a git-lfs server, objects are per repository)
    lfs_objects: set[str] = field(default_factory=set)

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit:
        """A branch, tag or full commit oid → the commit; :class:`StoreError` 404 ``RevisionNotFound`` otherwise."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        for prefix in ("refs/heads/", "refs/tags/"):
            if revision.startswith(prefix):
                return self.resolve(revision[len(prefix) :])
        if COMMIT_RE.match(revision) and revision in self.commits:
            return self.commits[revision]
        raise StoreError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, commit: Commit) -> list[Commit]:
        out, current = [], commit
        while True:
            out.append(current)
            if not current.parents:
                return out
            current = self.commits[current.parents[0]]


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

    def lfs_entry(self, repo: Repo, path: str, sha256: str, size: int) -> FileEntry:
        if not self.has_lfs(repo, sha256, size):
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
    ) -> Commit:
        """Create a commit on ``branch`` atomically; ``parent`` (if given) must be the branch head (else 412)."""
        for path in added:
            check_path(path)
        for path in deleted:
            check_path(path, folder=True)
        with self.lock:
            head = repo.branches.get(branch)
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
            repo.branches[branch] = oid
            self.save(repo)
            return commit

    def save(self, repo: Repo) -> None:
        data = {"type": repo.type, "id": repo.id, "private": repo.private, "owner": repo.owner,
                "created_at": repo.created_at, "branches": repo.branches, "tags": repo.tags,
                "lfs_objects": sorted(repo.lfs_objects)}
        _write_atomic(self._repo_dir(repo) / "repo.yaml", yaml.safe_dump(data, sort_keys=True))

    def _load(self) -> None:
        for record in sorted((self.root / "repos").glob("*/*/*/repo.yaml")):
            data = yaml.safe_load(record.read_text())
            repo = Repo(data["type"], data["id"], data["private"], data["owner"], data["created_at"],
                        data.get("branches", {}), data.get("tags", {}), lfs_objects=set(data.get("lfs_objects", [])))
            for path in (record.parent / "commits").glob("*.yaml"):
                c = yaml.safe_load(path.read_text())
                files = {p: FileEntry(p, e["sha256"], e["size"], e["git_oid"], e["lfs"]) for p, e in c["files"].items()}
                repo.commits[path.stem] = Commit(path.stem, c["parents"], c["title"], c["message"], c["author"], c["date"], files)
            self.repos[(repo.type, repo.id)] = repo
