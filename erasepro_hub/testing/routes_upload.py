"""Routes of the local Hub that write content: preupload, the LFS batch/upload/verify steps, and commits.

Every step needs write access to the repository (its namespace's owner or an
organisation member): a token in ``Authorization`` or, for the upload ``PUT`` — which
the client sends without one, as to the Hub's presigned storage URLs — the signed
upload link the batch endpoint handed to such a user (bound to the repository, the
object, its size, the user and an expiry). No token → 401, no write access → 403,
a private repository of somebody else → 404, and nothing is stored. Uploads are
streamed to disk under the store's size cap (413) and must hash to their oid (400).
Commit paths must stay inside the repository (:func:`.store.check_path`).

A commit lands on a branch or on a pull request's ref (``refs/pr/<n>``); ``?create_pr=1`` opens the next
pull request against the branch instead of moving it. A copy (``CommitOperationCopy``) of a file of the
repository arrives as an ordinary line: the regular file's bytes, or the LFS file's oid (without a size).
"""

from __future__ import annotations

import base64
import json
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

from .blobs import SHA256_RE
from .store import LFS_SUFFIXES, PR_REF_RE, StoreError, check_path
from .wire import PREFIX, REPO, TYPE, error, json_body, route

if TYPE_CHECKING:
    from .hub import HubServer

def _upload_mode(path: str, sample: bytes, size: int) -> str:
    if size >= 10 * 1024 * 1024 or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample:
        return "lfs"
    return "regular"


def _checked(path: object, *, folder: bool = False) -> str:
    try:
        return check_path(path, folder=folder)
    except StoreError as exc:
        raise error(exc.status, str(exc)) from None


@route("POST", "preupload", "/api/" + TYPE + "/" + REPO + r"/preupload/(?P<rev>[^/]+)")
def preupload(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    commit = server.resolve(repo, m["rev"])
    files = []
    for item in json_body(req).get("files", []):
        path = _checked(item.get("path") if isinstance(item, dict) else None)
        try:
            sample, size = base64.b64decode(item.get("sample", "")), int(item.get("size", 0))
        except ValueError:
            raise error(400, f"malformed preupload entry for {path!r}") from None
        mode = _upload_mode(path, sample, size)
        existing = commit.files.get(path)
        oid = None
        if existing is not None and existing.lfs == (mode == "lfs"):
            oid = existing.sha256 if existing.lfs else existing.git_oid
        files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return {"files": files, "commitOid": commit.oid}


@route("POST", "lfs-batch", "/" + PREFIX + r"(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch")
def lfs_batch(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo_type = m["prefix"].rstrip("/")[:-1] if m["prefix"] else "model"
    repo = server.repo(repo_type, m["ns"], m["name"], user)
    server.writable(repo, user)
    requested = json_body(req).get("objects", [])
    if not isinstance(requested, list):
        raise error(400, "'objects' must be a list")
    cap = server.store.max_upload_bytes
    checked = []
    for obj in requested:
        oid, size = (obj.get("oid"), obj.get("size")) if isinstance(obj, dict) else (None, None)
        if not isinstance(oid, str) or not SHA256_RE.match(oid):
            raise error(400, f"invalid LFS oid {oid!r}: expected a sha256 in lowercase hex")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise error(400, f"invalid size {size!r} for LFS object {oid}")
        if size > cap:
            raise error(413, f"LFS object {oid} is too large: {size} bytes, the limit of this Hub is {cap} bytes")
        checked.append((oid, size))
    objects = []
    for oid, size in checked:
        entry = {"oid": oid, "size": size, "authenticated": True}
        if not server.store.has_lfs(repo, oid, size):
            verify = f"{server.endpoint}/_lfs/{repo.type}s/{repo.id}/verify"
            upload = server.upload_link(repo, oid, size, user)
            entry["actions"] = {"upload": {"href": upload}, "verify": {"href": verify}}
        objects.append(entry)
    return {"transfer": "basic", "objects": objects}


@route("PUT", "lfs-upload", r"/_lfs/" + TYPE + "/" + REPO + r"/(?P<oid>[0-9a-f]{64})", stream=True)
def lfs_upload(server: HubServer, req, m):
    repo, size = server.uploader(req, m["type"][:-1], m["ns"], m["name"], m["oid"])
    cap = server.store.max_upload_bytes
    if req.stream.length is not None and req.stream.length > cap:  # refused before a byte is read
        raise error(413, f"upload too large: {req.stream.length} bytes, the limit of this Hub is {cap} bytes")
    try:
        server.store.put_lfs(repo, req.stream.chunks(), m["oid"], size)
    except StoreError as exc:
        raise error(exc.status, str(exc)) from None
    return {}


@route("POST", "lfs-verify", r"/_lfs/" + TYPE + "/" + REPO + r"/verify")
def lfs_verify(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    body = json_body(req)
    oid, size = body.get("oid"), body.get("size")
    if not isinstance(size, int) or not server.store.has_lfs(repo, oid, size):
        raise error(404, f"object {oid} was not uploaded")
    return {}


def _flag(req, name: str) -> bool:
    return parse_qs(req.query).get(name, [""])[0].lower() in ("1", "true")


@route("POST", "commit", "/api/" + TYPE + "/" + REPO + r"/commit/(?P<rev>[^/]+)")
def commit(server: HubServer, req, m):
    """A commit on a branch or on a pull request's ref ``refs/pr/<n>``; with ``?create_pr=1``, on a new pull
    request opened against the branch (``refs/pr/<n+1>``: the branch does not move)."""
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    ref = unquote(m["rev"])
    create_pr = _flag(req, "create_pr")
    if repo.ref_head(ref) is None or (create_pr and PR_REF_RE.match(ref)):
        kind = "a branch" if create_pr else "a branch or a pull request"
        raise error(404, f"Invalid rev id: {ref} is not {kind}", "RevisionNotFound")
    header, added, deleted = {}, {}, []
    try:
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        # every path is checked before anything is stored
        for line in lines:
            if line["key"] in ("file", "lfsFile", "deletedFile", "deletedFolder"):
                check_path(line["value"]["path"], folder=line["key"] == "deletedFolder")
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":
                added[value["path"]] = server.store.regular_entry(value["path"], base64.b64decode(value["content"]))
            elif key == "lfsFile":  # a copy of an LFS file of the repository names its oid only
                size = int(value["size"]) if value.get("size") is not None else None
                added[value["path"]] = server.store.lfs_entry(repo, value["path"], value["oid"], size)
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise error(400, f"unknown commit operation {key!r}")
        with server.store.lock:  # the pull request's number is taken by the commit that opens it
            target = repo.next_pr_ref() if create_pr else None
            result = server.store.commit(
                repo, ref, user, header.get("summary", ""), header.get("description", ""), added, deleted,
                header.get("parentCommit"), target=target,
            )
    except StoreError as exc:
        raise error(exc.status, str(exc), exc.code) from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise error(400, f"malformed commit payload: {exc}") from None
    host = req.headers.get("Host", server.endpoint.split("//", 1)[1])
    prefix = "" if repo.type == "model" else f"{repo.type}s/"
    base = f"http://{host}/{prefix}{repo.id}"
    pr_url = f"{base}/discussions/{target.rsplit('/', 1)[1]}" if target else None
    return {"commitOid": result.oid, "commitUrl": f"{base}/commit/{result.oid}", "pullRequestUrl": pr_url,
            "success": True}
