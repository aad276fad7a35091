"""Routes of the local Hub that manage and read repositories: identity, create/delete, YAML validation,
trees, refs, commits, paths, tag and branch creation, and file downloads (``/resolve`` and the storage port).
Repository info and listings are in :mod:`.routes_listing`; deletions of refs and settings in
:mod:`.routes_manage`.

Reads follow visibility (a private repository is a 404 to anybody without write access to it);
tags and branches need write access. The files of a gated repository are for those with write access
(401/403 ``GatedRepo`` to others; its metadata and file list stay readable). Large files answer
``/resolve`` with a 302 to the storage port (another origin, as the Hub's CDN), whose links are signed.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, unquote

import yaml

from ..layout import front_matter_text
from .store import COMMIT_RE, REPO_TYPES
from .wire import PREFIX, REPO, TYPE, Reply, error, json_body, route

if TYPE_CHECKING:
    from .hub import HubServer

def _entry_json(entry) -> dict:
    data = {"type": "file", "path": entry.path, "size": entry.size, "oid": entry.git_oid}
    if entry.lfs:
        data["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": 134}
    return data


@route("GET", "whoami", r"/api/whoami-v2")
def whoami(server: HubServer, req, m):
    user = server.require_user(req.headers)
    orgs = [{"name": org, "type": "org"} for org, members in server.store.orgs.items() if user in members]
    return {"type": "user", "name": user, "fullname": user, "orgs": orgs,
            "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}}


@route("POST", "repo-create", r"/api/repos/create")
def create_repo(server: HubServer, req, m):
    user = server.require_user(req.headers)
    body = json_body(req)
    name, org = body.get("name"), body.get("organization")
    repo_type = body.get("type") or "model"
    if repo_type not in REPO_TYPES or not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}", name):
        raise error(400, f"invalid repository name or type: {name!r} ({repo_type})")
    namespace = org or user
    if not server.store.can_write(user, namespace):
        raise error(403, f"You don't have the rights to create a repository under {namespace}", "Forbidden")
    private = body.get("visibility") == "private" or bool(body.get("private"))
    repo, created = server.store.create_repo(repo_type, f"{namespace}/{name}", user, private)
    payload = {"url": server.url_for(repo), "name": repo.id, "id": repo.id}
    if not created:
        raise Reply(409, {**payload, "error": "You already created this repo"})
    return payload


@route("DELETE", "repo-delete", r"/api/repos/delete")
def delete_repo(server: HubServer, req, m):
    user = server.require_user(req.headers)
    body = json_body(req)
    namespace = body.get("organization") or user
    repo = server.repo(body.get("type") or "model", namespace, body.get("name", ""), user)
    server.writable(repo, user)
    server.store.delete_repo(repo)
    return {}


@route("POST", "validate-yaml", r"/api/validate-yaml")
def validate_yaml(server: HubServer, req, m):
    content = json_body(req).get("content", "")
    text = front_matter_text(content)
    errors = []
    if text is not None:
        try:
            if not isinstance(yaml.safe_load(text) or {}, dict):
                errors.append({"message": "metadata must be a YAML mapping"})
        except yaml.YAMLError as exc:
            errors.append({"message": f"invalid YAML: {exc}"})
    if errors:
        raise Reply(400, {"errors": errors, "warnings": [], "error": errors[0]["message"]})
    return {"errors": [], "warnings": []}


@route("GET", "tree", "/api/" + TYPE + "/" + REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
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
        raise error(404, f"{base} does not exist at this revision", "EntryNotFound")
    dirs = [{"type": "directory", "path": f, "oid": hashlib.sha1(f.encode()).hexdigest()} for f in sorted(folders)]
    return {"_list": dirs + items}


@route("GET", "refs", "/api/" + TYPE + "/" + REPO + r"/refs")
def refs(server: HubServer, req, m):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in sorted(repo.branches.items())]
    tags = [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": oid} for t, oid in sorted(repo.tags.items())]
    answer = {"branches": branches, "tags": tags, "converts": []}
    if parse_qs(req.query).get("include_prs", [""])[0].lower() in ("1", "true"):
        answer["pullRequests"] = [{"name": f"refs/pr/{n}", "ref": f"refs/pr/{n}", "targetCommit": oid}
                                  for n, oid in sorted(repo.pull_requests.items())]
    return answer


@route("GET", "commits", "/api/" + TYPE + "/" + REPO + r"/commits/(?P<rev>[^/]+)")
def commits(server: HubServer, req, m):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    head = server.resolve(repo, m["rev"])
    return {"_list": [{"id": c.oid, "authors": [{"user": c.author}], "date": c.date, "title": c.title,
                       "message": c.message} for c in repo.history(head)]}


@route("POST", "paths-info", "/api/" + TYPE + "/" + REPO + r"/paths-info/(?P<rev>[^/]+)")
def paths_info(server: HubServer, req, m):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    commit = server.resolve(repo, m["rev"])
    paths = json_body(req).get("paths", [])
    paths = [paths] if isinstance(paths, str) else paths
    return {"_list": [_entry_json(commit.files[p]) for p in paths if p in commit.files]}


@route("POST", "tag", "/api/" + TYPE + "/" + REPO + r"/tag/(?P<rev>[^/]+)")
def create_tag(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    commit = server.resolve(repo, m["rev"])
    tag = json_body(req).get("tag")
    if not isinstance(tag, str) or not tag or "/" in tag:
        raise error(400, f"invalid tag {tag!r}")
    with server.store.lock:
        if tag in repo.tags:
            raise error(409, f"Tag {tag} already exists")
        repo.tags[tag] = commit.oid
        server.store.save(repo)
    return {}


@route("POST", "branch", "/api/" + TYPE + "/" + REPO + r"/branch/(?P<branch>[^/]+)")
def create_branch(server: HubServer, req, m):
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    branch = unquote(m["branch"])
    if not branch or branch.startswith("refs/") or COMMIT_RE.match(branch):  # would shadow another ref
        raise error(400, f"Invalid reference for a branch name: {branch!r}")
    start = server.resolve(repo, json_body(req).get("startingPoint") or "main")
    with server.store.lock:
        if branch in repo.branches:
            raise error(409, f"Branch {branch} already exists")
        repo.branches[branch] = start.oid
        server.store.save(repo)
    return {}


@route("HEAD", "resolve", "/" + PREFIX + REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
def resolve_head(server, req, m):
    return _resolve(server, req, m)


@route("GET", "resolve", "/" + PREFIX + REPO + r"/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
def resolve_get(server, req, m):
    return _resolve(server, req, m)


def _resolve(server: HubServer, req, m):
    repo_type = m["prefix"].rstrip("/")[:-1] if m["prefix"] else "model"
    user = server.user(req.headers)
    repo = server.repo(repo_type, m["ns"], m["name"], user)
    if repo.gated and not server.store.can_write(user, repo.namespace):
        message = f"Access to {repo.id} is restricted: it is a gated repository"
        raise error(401 if user is None else 403, message, "GatedRepo")
    commit = server.resolve(repo, m["rev"])
    path = unquote(m["path"])
    entry = commit.files.get(path)
    if entry is None:
        raise error(404, f"{path} does not exist at {commit.oid}", "EntryNotFound")
    headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"'}
    if entry.lfs:
        location = f"{server.storage_endpoint}/blobs/{entry.sha256}?sig={server.sign(entry.sha256)}"
        headers.update({"Location": location, "X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": str(entry.size)})
        raise Reply(302, None, headers, raw=b"")
    raise Reply(200, None, headers, raw=server.store.read_blob(entry.sha256))


@route("GET", "blob", r"/blobs/(?P<sha>[0-9a-f]{64})")
def blob(server: HubServer, req, m):
    sig = parse_qs(req.query).get("sig", [""])[0]
    if not hmac.compare_digest(sig, server.sign(m["sha"])) or not server.store.has_blob(m["sha"]):
        raise error(403, "invalid or expired link")
    raise Reply(200, None, {"ETag": f'"{m["sha"]}"'}, raw=server.store.read_blob(m["sha"]))


@route("HEAD", "blob", r"/blobs/(?P<sha>[0-9a-f]{64})")
def blob_head(server, req, m):
    return blob(server, req, m)
