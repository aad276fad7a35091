"""Routes of the local Hub that change a repository's refs and settings: branch and tag deletion
(``DELETE /api/{type}s/{repo}/branch|tag/{name}``, the name percent-encoded) and
``PUT /api/{type}s/{repo}/settings`` (visibility, gating).

As every change, they need write access: no token → 401, no write access → 403, a private repository
of somebody else → 404 ``RepoNotFound``. The default branch ``main`` cannot be deleted (403); a branch
or tag that does not exist is a 404 ``RevisionNotFound``. Commits stay stored when their refs go.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import unquote

from .store import GATED_VALUES
from .wire import REPO, TYPE, error, json_body, route

if TYPE_CHECKING:
    from .hub import HubServer
    from .store import Repo

DEFAULT_BRANCH = "main"


def _writable_repo(server: HubServer, req, m) -> tuple[Repo, str]:
    user = server.require_user(req.headers)
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], user)
    server.writable(repo, user)
    return repo, user


@route("DELETE", "branch-delete", "/api/" + TYPE + "/" + REPO + r"/branch/(?P<branch>[^/]+)")
def delete_branch(server: HubServer, req, m):
    repo, _ = _writable_repo(server, req, m)
    branch = unquote(m["branch"])
    if branch == DEFAULT_BRANCH:
        raise error(403, f"Cannot delete the default branch {branch} of {repo.id}", "Forbidden")
    with server.store.lock:
        if branch not in repo.branches:
            raise error(404, f"Invalid rev id: branch {branch} does not exist", "RevisionNotFound")
        del repo.branches[branch]
        server.store.save(repo)
    return {}


@route("DELETE", "tag-delete", "/api/" + TYPE + "/" + REPO + r"/tag/(?P<tag>[^/]+)")
def delete_tag(server: HubServer, req, m):
    repo, _ = _writable_repo(server, req, m)
    tag = unquote(m["tag"])
    with server.store.lock:
        if tag not in repo.tags:
            raise error(404, f"Invalid rev id: tag {tag} does not exist", "RevisionNotFound")
        del repo.tags[tag]
        server.store.save(repo)
    return {}


@route("PUT", "settings", "/api/" + TYPE + "/" + REPO + r"/settings")
def update_settings(server: HubServer, req, m):
    repo, _ = _writable_repo(server, req, m)
    body = json_body(req)
    changes: dict = {}
    if "visibility" in body:
        if body["visibility"] not in ("public", "private"):
            raise error(400, f"invalid visibility {body['visibility']!r}: expected 'public' or 'private'")
        changes["private"] = body["visibility"] == "private"
    elif "private" in body:  # older clients send a boolean
        if not isinstance(body["private"], bool):
            raise error(400, f"invalid private {body['private']!r}: expected true or false")
        changes["private"] = body["private"]
    if "gated" in body:
        gated = body["gated"]
        if not (gated is False or (isinstance(gated, str) and gated in GATED_VALUES)):
            raise error(400, f"invalid gated {gated!r}: expected false, 'auto' or 'manual'")
        changes["gated"] = gated
    if not changes:
        raise error(400, "nothing to update: pass visibility and/or gated")
    with server.store.lock:
        for key, value in changes.items():
            setattr(repo, key, value)
        server.store.save(repo)
    return {}
