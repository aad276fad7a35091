"""A local Hugging Face Hub–compatible server for tests and the offline demo.

Standard library + PyYAML, bound to 127.0.0.1 only. It speaks the subset of the
Hub's HTTP API that ``huggingface_hub`` (with Xet disabled) uses to create
repositories, commit (regular and LFS files), tag and branch, read repository
info, trees, refs, commits and paths, and download files by revision. Tokens map
to users; a user writes to their own namespace and their organisations', and
private repositories are invisible (404) to everybody else.

Large files answer ``/resolve`` with a 302 to a second port (a different origin,
as the Hub's CDN is), carrying ``X-Linked-Etag``/``X-Linked-Size``; the storage URL
is signed, so private content is not readable without a valid link.

For tests: :class:`HubServer` keeps a request log (every request names the route
it matched, ``UNKNOWN`` otherwise — a contract test fails on those) and a
:class:`Faults` plan that injects 500s, dropped connections and tampered
downloads at named steps.

Run it for the offline demo::

    python -m erasepro_hub.testing.hub --root /tmp/hub --port 8765
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

from ..layout import front_matter, front_matter_text
from .store import LFS_SUFFIXES, REPO_TYPES, Repo, Store, StoreError

#: The built-in users of the demo server: token → user. The tokens are public test values.
DEFAULT_USERS = {
    "hf_demo_write_token_not_secret": "demo",
    "hf_alice_write_token_not_secret": "alice",
    "hf_bob_write_token_not_secret": "bob",
}
DEFAULT_ORGS = {"erasepro-org": ["alice"]}

_REPO = r"(?P<ns>[^/]+)/(?P<name>[^/]+)"
_TYPE = r"(?P<type>models|datasets|spaces)"
_PREFIX = r"(?P<prefix>(?:datasets/|spaces/)?)"


@dataclass
class RequestRecord:
    method: str
    route: str
    path: str
    status: int = 0


@dataclass
class Fault:
    step: str
    kind: str  # "500" | "drop" | "drop-after" | "tamper" | "slow"
    times: int | None  # None: until cleared
    match: str | None = None  # only requests whose path contains this


@dataclass
class Faults:
    """Injected failures by route name (``preupload``, ``lfs-batch``, ``lfs-upload``, ``commit``, ``resolve``,
    ``blob`` …): ``500`` answers an error, ``drop`` closes the connection before the work, ``drop-after`` after
    it, ``tamper`` flips the first byte of a file download, ``slow`` waits :attr:`slow_seconds` before
    answering (past a client's timeout). ``times=None`` lasts until :meth:`clear`."""

    slow_seconds: float = 6.0

    rules: list[Fault] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, step: str, kind: str, times: int | None = None, match: str | None = None) -> None:
        with self.lock:
            self.rules.append(Fault(step, kind, times, match))

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()

    def take(self, step: str, path: str = "") -> str | None:
        with self.lock:
            for rule in self.rules:
                if rule.match is not None and rule.match not in path:
                    continue
                if rule.step == step and (rule.times is None or rule.times > 0):
                    if rule.times is not None:
                        rule.times -= 1
                    return rule.kind
        return None


class _Drop(Exception):
    """Close the connection without an answer."""


class _Reply(Exception):
    def __init__(self, status: int, body: object = None, headers: dict | None = None, raw: bytes | None = None):
        self.status, self.body, self.headers, self.raw = status, body, headers or {}, raw


def _error(status: int, message: str, code: str | None = None) -> _Reply:
    headers = {"X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return _Reply(status, {"error": message}, headers)


class HubServer:
    """The server: an API port and a storage port, both on 127.0.0.1."""

    def __init__(self, root: str | Path, *, port: int = 0, users: dict | None = None, orgs: dict | None = None):
        self.store = Store(root, users=users or DEFAULT_USERS, orgs=orgs if orgs is not None else DEFAULT_ORGS)
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self._secret = secrets.token_bytes(16)
        self.api = ThreadingHTTPServer(("127.0.0.1", port), _make_handler(self, api=True))
        self.storage = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self, api=False))
        self.api.daemon_threads = self.storage.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.api.server_address[1]}"

    @property
    def storage_endpoint(self) -> str:
        return f"http://127.0.0.1:{self.storage.server_address[1]}"

    def start(self) -> "HubServer":
        for server in (self.api, self.storage):
            thread = threading.Thread(target=server.serve_forever, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in (self.api, self.storage):
            server.shutdown()
            server.server_close()

    @property
    def unknown_requests(self) -> list[RequestRecord]:
        return [r for r in self.requests if r.route == "UNKNOWN"]

    def sign(self, sha256: str) -> str:
        return hmac.new(self._secret, sha256.encode(), hashlib.sha256).hexdigest()

    # ------------------------------------------------------------------ helpers
    def user(self, headers) -> str | None:
        auth = headers.get("Authorization", "")
        token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        if token and self.store.user_for(token) is None:
            raise _error(401, "Invalid credentials in Authorization header", "Unauthorized")
        return self.store.user_for(token)

    def require_user(self, headers) -> str:
        user = self.user(headers)
        if user is None:
            raise _error(401, "You must be authenticated to do this: pass a token", "Unauthorized")
        return user

    def repo(self, repo_type: str, ns: str, name: str, user: str | None) -> Repo:
        try:
            return self.store.get(repo_type, f"{unquote(ns)}/{unquote(name)}", user)
        except StoreError as exc:
            raise _error(exc.status, str(exc), exc.code) from None

    def writable(self, repo: Repo, user: str) -> None:
        if not self.store.can_write(user, repo.namespace):
            raise _error(403, f"You don't have the rights to write to {repo.id}", "Forbidden")

    def resolve(self, repo: Repo, revision: str):
        try:
            return repo.resolve(unquote(revision))
        except StoreError as exc:
            raise _error(exc.status, str(exc), exc.code) from None

    def url_for(self, repo: Repo) -> str:
        prefix = "" if repo.type == "model" else f"{repo.type}s/"
        return f"{self.endpoint}/{prefix}{repo.id}"


# ----------------------------------------------------------------------------- routes
Route = tuple[str, str, "re.Pattern[str]", Callable]
_ROUTES: list[Route] = []


def route(method: str, name: str, pattern: str):
    def register(func):
        _ROUTES.append((method, name, re.compile("^" + pattern + "$"), func))
        return func

    return register


def _json_body(req) -> dict:
    raw = req.body
    if not raw:
        return {}
    ctype = req.headers.get("Content-Type", "")
    if "application/x-www-form-urlencoded" in ctype:
        return {k: v if len(v) > 1 or k == "paths" else v[0] for k, v in parse_qs(raw.decode()).items()}
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        raise _error(400, "request body is not valid JSON") from None
    return data if isinstance(data, dict) else {"_list": data}


def _entry_json(entry) -> dict:
    data = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.git_oid}
    if entry.lfs:
        data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
    return data


def _card_data(server: HubServer, commit) -> dict | None:
    entry = commit.files.get("README.md")
    if entry is None:
        return None
    return front_matter(server.store.read_blob(entry.sha256).decode("utf-8", "replace"))


@route("GET", "whoami", r"/api/whoami-v2")
def whoami(server: HubServer, req, m):
    user = server.require_user(req.headers)
    orgs = [{"name": org, "type": "org"} for org, members in server.store.orgs.items() if user in members]
    return {"type": "user", "name": user, "fullname": user, "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}


@route("POST", "repo-create", r"/api/repos/create")
def create_repo(server: HubServer, req, m):
    user = server.require_user(req.headers)
    body = _json_body(req)
    name, org = body.get("name"), body.get("organization")
    repo_type = body.get("type") or "model"
    if repo_type not in REPO_TYPES or not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
        raise _error(400, f"invalid repository name or type: {name!r} ({repo_type})")
    namespace = org or user
    if not server.store.can_write(user, namespace):
        raise _error(403, f"You don't have the rights to create a repository under {namespace}", "Forbidden")
    private = body.get("visibility") == "private" or bool(body.get("private"))
    repo, created = server.store.create_repo(repo_type, f"{namespace}/{name}", user, private)
    payload = {"url": server.url_for(repo), "name": repo.id, "id": repo.id}
    if not created:
        raise _Reply(409, {**payload, "error": "You already created this repo"})
    return payload


@route("DELETE", "repo-delete", r"/api/repos/delete")
def delete_repo(server: HubServer, req, m):
    user = server.require_user(req.headers)
    body = _json_body(req)
    namespace = body.get("organization") or user
    repo = server.repo(body.get("type") or "model", namespace, body.get("name", ""), user)
    server.writable(repo, user)
    server.store.delete_repo(repo)
    return {}


@route("POST", "validate-yaml", r"/api/validate-yaml")
def validate_yaml(server: HubServer, req, m):
    content = _json_body(req).get("content", "")
    text = front_matter_text(content)
    errors = []
    if text is not None:
        try:
            if not isinstance(yaml.safe_load(text) or {}, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
        except yaml.YAMLError as exc:
            errors.append({"message": f"invalid YAML: {exc}"})
    if errors:
        raise _Reply(400, {"errors": errors, "warnings": [], "error": errors[0]["message"]})
    return {"errors": [], "warnings": []}


def _upload_mode(path: str, sample: bytes, size: int) -> str:
    if size >= 10 * 1024 * 1024 or path.lower().endswith(LFS_SUFFIXES) or b"\0" in sample:
        return "lfs"
    return "regular"


@route("POST", "preupload", "/api/" + _TYPE + "/" + _REPO + r"/preupload/(?P<rev>[^/]+)")
def preupload(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    commit = server.resolve(repo, m["rev"])
    files = []
    for item in _json_body(req).get("files", []):
        sample = base64.b64decode(item.get("sample", ""))
        mode = _upload_mode(item["path"], sample, int(item.get("size", 0)))
        existing = commit.files.get(item["path"])
        oid = None
        if existing is not None and existing.lfs == (mode == "lfs"):
            oid = existing.sha256 if existing.lfs else existing.git_oid
        files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return {"files": files, "commitOid": commit.oid}


@route("POST", "lfs-batch", "/" + _PREFIX + r"(?P<ns>[^/]+)/(?P<name>[^/]+)\.git/info/lfs/objects/batch")
def lfs_batch(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo_type = m["prefix"].rstrip("/")[:-1] if m["prefix"] else "model"
    repo = server.repo(repo_type, m["ns"], m["name"], user)
    server.writable(repo, user)
    body = _json_body(req)
    objects = []
    for obj in body.get("objects", []):
        oid, size = obj["oid"], int(obj["size"])
        entry = {"oid": oid, "size": size, "authenticated": True}
        if not server.store.has_lfs(repo, oid, size):
            where = f"{server.endpoint}/_lfs/{repo.type}s/{repo.id}"
            entry["actions"] = {"upload": {"href": f"{where}/{oid}"}, "verify": {"href": f"{where}/verify"}}
        objects.append(entry)
    return {"transfer": "basic", "objects": objects}


@route("PUT", "lfs-upload", r"/_lfs/" + _TYPE + "/" + _REPO + r"/(?P<oid>[0-9a-f]{64})")
def lfs_upload(server: HubServer, req, m):
    # as with the Hub's storage URLs, no Authorization header: the href itself is the permission
    repo = server.store.repos.get((m["type"][:-1], f"{unquote(m['ns'])}/{unquote(m['name'])}"))
    if repo is None:
        raise _error(404, "Repository not found", "RepoNotFound")
    try:
        server.store.put_lfs(repo, req.body, m["oid"])
    except StoreError as exc:
        raise _error(exc.status, str(exc)) from None
    return {}


@route("POST", "lfs-verify", r"/_lfs/" + _TYPE + "/" + _REPO + r"/verify")
def lfs_verify(server: HubServer, req, m):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    body = _json_body(req)
    if not server.store.has_lfs(repo, str(body.get("oid")), int(body.get("size", -1))):
        raise _error(404, f"object {body.get('oid')} was not uploaded")
    return {}


@route("POST", "commit", "/api/" + _TYPE + "/" + _REPO + r"/commit/(?P<rev>[^/]+)")
def commit(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    branch = unquote(m["rev"])
    if branch not in repo.branches:
        raise _error(404, f"Invalid rev id: {branch} is not a branch", "RevisionNotFound")
    header, added, deleted = {}, {}, []
    try:
        lines = [json.loads(line) for line in req.body.decode().splitlines() if line.strip()]
        for line in lines:
            key, value = line["key"], line["value"]
            if key == "header":
                header = value
            elif key == "file":
                added[value["path"]] = server.store.regular_entry(value["path"], base64.b64decode(value["content"]))
            elif key == "lfsFile":
                added[value["path"]] = server.store.lfs_entry(repo, value["path"], value["oid"], int(value["size"]))
            elif key in ("deletedFile", "deletedFolder"):
                deleted.append(value["path"])
            else:
                raise _error(400, f"unknown commit operation {key!r}")
        result = server.store.commit(
            repo, branch, user, header.get("summary", ""), header.get("description", ""), added, deleted,
            header.get("parentCommit"),
        )
    except StoreError as exc:
        raise _error(exc.status, str(exc), exc.code) from None
    except (KeyError, ValueError, json.JSONDecodeError) as exc:
        raise _error(400, f"malformed commit payload: {exc}") from None
    host = req.headers.get("Host", server.endpoint.split("//", 1)[1])
    prefix = "" if repo.type == "model" else f"{repo.type}s/"
    return {"commitOid": result.oid, "commitUrl": f"http://{host}/{prefix}{repo.id}/commit/{result.oid}",
            "pullRequestUrl": None, "success": True}


def _info(server: HubServer, req, m, revision: str | None):
    user = server.user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    commit = server.resolve(repo, revision or "main")
    blobs = "blobs" in parse_qs(req.query) and parse_qs(req.query)["blobs"][0].lower() in ("1", "true")
    siblings = []
    for path in sorted(commit.files):
        entry = commit.files[path]
        sibling = {"rfilename": path}
        if blobs:
            sibling.update(size=entry.size, blobId=entry.git_oid)
            if entry.lfs:
                sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}
        siblings.append(sibling)
    card = _card_data(server, commit)
    return {"_id": repo.id, "id": repo.id, "modelId": repo.id, "author": repo.namespace, "sha": commit.oid,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": list((card or {}).get("tags") or []), "siblings": siblings, "cardData": card,
            "lastModified": commit.date, "createdAt": repo.created_at, "usedStorage": 0}


@route("GET", "repo-info", "/api/" + _TYPE + "/" + _REPO)
def repo_info(server, req, m):
    return _info(server, req, m, None)


@route("GET", "repo-info-rev", "/api/" + _TYPE + "/" + _REPO + r"/revision/(?P<rev>[^/]+)")
def repo_info_rev(server, req, m):
    return _info(server, req, m, m["rev"])


@route("GET", "tree", "/api/" + _TYPE + "/" + _REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
def tree(server: HubServer, req, m):
    user = server.user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    commit = server.resolve(repo, m["rev"])
    base = unquote(m["path"] or "").strip("/")
    recursive = parse_qs(req.query).get("recursive", ["false"])[0].lower() in ("1", "true")
    prefix = base + "/" if base else ""
    items, folders = [], set()
    for path in sorted(commit.files):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        if "/" in rest and not recursive:
            folders.add(prefix + rest.split("/", 1)[0])
            continue
        if recursive:
            parts = rest.split("/")[:-1]
            folders.update(prefix + "/".join(parts[: i + 1]) for i in range(len(parts)))
        items.append(_entry_json(commit.files[path]))
    if base and not items and not folders:
        raise _error(404, f"{base} does not exist at this revision", "EntryNotFound")
    dirs = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
    return {"_list": dirs + items}


@route("GET", "refs", "/api/" + _TYPE + "/" + _REPO + r"/refs")
def refs(server: HubServer, req, m):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in sorted(repo.branches.items())]
    tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": oid} for t, oid in sorted(repo.tags.items())]
    return {"branches": branches, "tags": tags, "converts": []}


@route("GET", "commits", "/api/" + _TYPE + "/" + _REPO + r"/commits/(?P<rev>[^/]+)")
def commits(server: HubServer, req, m):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    head = server.resolve(repo, m["rev"])
    return {"_list": [{"id": c.oid, "authors": [{"user": c.author}], "date": c.date, "title": c.title,
                       "message": c.message} for c in repo.history(head)]}


@route("POST", "paths-info", "/api/" + _TYPE + "/" + _REPO + r"/paths-info/(?P<rev>[^/]+)")
def paths_info(server: HubServer, req, m):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    commit = server.resolve(repo, m["rev"])
    paths = _json_body(req).get("paths", [])
    paths = [paths] if isinstance(paths, str) else paths
    return {"_list": [_entry_json(commit.files[p]) for p in paths if p in commit.files]}


@route("POST", "tag", "/api/" + _TYPE + "/" + _REPO + r"/tag/(?P<rev>[^/]+)")
def create_tag(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    commit = server.resolve(repo, m["rev"])
    tag = _json_body(req).get("tag")
    if not isinstance(tag, str) or not tag or "/" in tag:
        raise _error(400, f"invalid tag {tag!r}")
    with server.store.lock:
        if tag in repo.tags:
            raise _error(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        server.store.save(repo)
    return {}


@route("POST", "branch", "/api/" + _TYPE + "/" + _REPO + r"/branch/(?P<branch>[^/]+)")
def create_branch(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    branch = unquote(m["branch"])
    start = server.resolve(repo, _json_body(req).get("startingPoint") or "main")
    with server.store.lock:
        if branch in repo.branches:
            raise _error(409, f"Branch {branch} already exists")
        repo.branches[branch] = start.oid
        server.store.save(repo)
    return {}


@route("HEAD", "resolve", "/" + _PREFIX + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
def resolve_head(server, req, m):
    return _resolve(server, req, m)


@route("GET", "resolve", "/" + _PREFIX + _REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
def resolve_get(server, req, m):
    return _resolve(server, req, m)


def _resolve(server: HubServer, req, m):
    repo_type = m["prefix"].rstrip("/")[:-1] if m["prefix"] else "model"
    repo = server.repo(repo_type, m["ns"], m["name"], server.user(req.headers))
    commit = server.resolve(repo, m["rev"])
    path = unquote(m["path"])
    entry = commit.files.get(path)
    if entry is None:
        raise _error(404, f"{path} does not exist at {commit.oid}", "EntryNotFound")
    headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"'}
    if entry.lfs:
        location = f"{server.storage_endpoint}/blobs/{entry.sha256}?sig={server.sign(entry.sha256)}"
        headers.update({"Location": location, "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        raise _Reply(302, None, headers, raw=b"")
    raise _Reply(200, None, headers, raw=server.store.read_blob(entry.sha256))


@route("GET", "blob", r"/blobs/(?P<sha>[0-9a-f]{64})")
def blob(server: HubServer, req, m):
    sig = parse_qs(req.query).get("sig", [""])[0]
    if not hmac.compare_digest(sig, server.sign(m["sha"])) or not server.store.has_blob(m["sha"]):
        raise _error(403, "invalid or expired link")
    raise _Reply(200, None, {"ETag": f'"{m["sha"]}"'}, raw=server.store.read_blob(m["sha"]))


@route("HEAD", "blob", r"/blobs/(?P<sha>[0-9a-f]{64})")
def blob_head(server, req, m):
    return blob(server, req, m)


# ----------------------------------------------------------------------------- handler
def _make_handler(server: HubServer, *, api: bool):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True
        server_version = "erasepro-test-hub/1"

        def log_message(self, format, *args):  # noqa: A002 - silence the default stderr log
            pass

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        def _handle(self, method: str) -> None:
            split = urlsplit(self.path)
            self.query = split.query
            record = RequestRecord(method, "UNKNOWN", split.path)
            server.requests.append(record)
            try:
                self.body = self._read_body() if method in ("POST", "PUT", "DELETE") else b""
                for route_method, name, pattern, func in _ROUTES:
                    allowed = name == "blob" if not api else name != "blob"
                    if route_method != method or not allowed:
                        continue
                    match = pattern.match(split.path)
                    if match is None:
                        continue
                    record.route = name
                    fault = server.faults.take(name, split.path)
                    if fault == "500":
                        raise _error(500, f"injected failure at {name}")
                    if fault == "drop":
                        raise _Drop()
                    if fault == "slow":  # (an Event wait: tests may stub time.sleep for the client's backoff)
                        threading.Event().wait(server.faults.slow_seconds)
                    try:
                        reply = _Reply(200, func(server, self, match))
                    except _Reply as answer:
                        reply = answer
                    if fault == "drop-after":  # the work is done, the answer is lost
                        raise _Drop()
                    if fault == "tamper" and reply.raw:
                        reply.raw = bytes([reply.raw[0] ^ 0xFF]) + reply.raw[1:]
                    raise reply
                raise _error(404, f"erasepro test hub: unknown route {method} {split.path}", "RouteNotFound")
            except _Drop:
                record.status = -1
                self.close_connection = True
                try:
                    self.connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            except _Reply as reply:
                record.status = reply.status
                self._send(method, reply)
            except Exception as exc:  # a bug in the test server: answer 500 with the reason
                record.status = 500
                self._send(method, _error(500, f"test hub internal error: {type(exc).__name__}: {exc}"))

        def handle_one_request(self):  # a client that gave up (timeout) must not crash the server thread
            try:
                super().handle_one_request()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

        def _send(self, method: str, reply: _Reply) -> None:
            if reply.raw is not None:
                body = reply.raw
                content_type = "application/octet-stream"
            else:
                payload = reply.body
                if isinstance(payload, dict) and set(payload) == {"_list"}:
                    payload = payload["_list"]
                body = json.dumps(payload if payload is not None else {}).encode()
                content_type = "application/json"
            self.send_response(reply.status)
            for key, value in reply.headers.items():
                self.send_header(key, value)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if method != "HEAD":
                self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            self._handle("GET")

        def do_HEAD(self):  # noqa: N802
            self._handle("HEAD")

        def do_POST(self):  # noqa: N802
            self._handle("POST")

        def do_PUT(self):  # noqa: N802
            self._handle("PUT")

        def do_DELETE(self):  # noqa: N802
            self._handle("DELETE")

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m erasepro_hub.testing.hub",
        description="A local Hub-compatible server (127.0.0.1 only) for the offline demo and tests.",
    )
    parser.add_argument("--root", required=True, help="folder that holds the repositories (created if missing)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--users", help="YAML file {tokens: {token: user}, orgs: {org: [users]}} (default: demo users)")
    args = parser.parse_args(argv)
    users, orgs = DEFAULT_USERS, DEFAULT_ORGS
    if args.users:
        data = yaml.safe_load(Path(args.users).read_text()) or {}
        users, orgs = data.get("tokens", {}), data.get("orgs", {})
    server = HubServer(args.root, port=args.port, users=users, orgs=orgs).start()
    print(f"local hub at {server.endpoint} (storage {server.storage_endpoint}), root {args.root}", file=sys.stderr)
    print(server.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
