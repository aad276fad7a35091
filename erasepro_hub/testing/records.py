"""What a local Hub repository holds: files, commits, refs (branches, tags, pull requests), settings.

Plain records, shared by :mod:`.store` (which persists them) and the routes; plus the rules every commit
path follows (:func:`check_path`) and the git object id of a blob. Standard library only.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import re
from dataclasses import dataclass, field

from .blobs import StoreError

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


#: A pull request's ref: ``refs/pr/<number>``, numbered from 1 in each repository.
PR_REF_RE = re.compile(r"^refs/pr/([1-9][0-9]{0,8})$")
#: What ``gated`` may be: not gated, or access granted automatically / by the owner.
GATED_VALUES = (False, "auto", "manual")


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
    #: pull request number → head commit of its ref ``refs/pr/<number>``
    pull_requests: dict[int, str] = field(default_factory=dict)
    #: ``False``, ``"auto"`` or ``"manual"``: the files of a gated repository are for those with access
    gated: bool | str = False

    @property
    def namespace(self) -> str:
        return self.id.split("/", 1)[0]

    def ref_head(self, ref: str) -> str | None:
        """The head commit of a branch or of ``refs/pr/<n>`` (``None`` when there is no such ref)."""
        match = PR_REF_RE.match(ref)
        if match:
            return self.pull_requests.get(int(match[1]))
        return self.branches.get(ref[len("refs/heads/") :] if ref.startswith("refs/heads/") else ref)

    def set_ref(self, ref: str, oid: str) -> None:
        match = PR_REF_RE.match(ref)
        if match:
            self.pull_requests[int(match[1])] = oid
        else:
            self.branches[ref[len("refs/heads/") :] if ref.startswith("refs/heads/") else ref] = oid

    def next_pr_ref(self) -> str:
        return f"refs/pr/{max(self.pull_requests, default=0) + 1}"

    def resolve(self, revision: str) -> Commit:
        """A branch, tag, ``refs/pr/<n>`` or full commit oid → the commit; :class:`StoreError` 404
        ``RevisionNotFound`` otherwise."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.tags:
            return self.commits[self.tags[revision]]
        match = PR_REF_RE.match(revision)
        if match and int(match[1]) in self.pull_requests:
            return self.commits[self.pull_requests[int(match[1])]]
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
