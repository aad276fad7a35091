"""Routes of the local Hub that describe repositories: info (``/api/models/{repo}[/revision/{rev}]``) and
listings (``/api/models?author=&search=&limit=``, datasets and spaces alike).

A repository's ``cardData``, ``library_name``, ``pipeline_tag`` and ``tags`` come from the README.md front
matter of the revision described (for a listing, the head of ``main``). As on the Hub, ``tags`` holds the
card's tags followed by the library, the pipeline tag, ``license:…``, ``dataset:…`` and ``base_model:…``.

A listing shows only what the caller may read (private repositories to those with write access), in
pages of at most ``limit`` (default and cap :data:`PAGE_LIMIT`), the next page named by a
``Link: <…>; rel="next"`` header, as the Hub paginates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlencode

from ..layout import front_matter
from .store import StoreError
from .wire import REPO, TYPE, Reply, error, route

if TYPE_CHECKING:
    from .hub import HubServer
    from .store import Commit, Repo

#: The most entries one page of a listing holds (the Hub's own cap).
PAGE_LIMIT = 1000
#: The keys of a listing entry when no ``expand``/``full`` asks for more (the Hub's default set).
LIST_KEYS = ("_id", "id", "modelId", "author", "sha", "private", "gated", "disabled", "downloads", "likes",
             "tags", "pipeline_tag", "library_name", "cardData", "lastModified", "createdAt")


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []


def card_fields(server: HubServer, commit: Commit) -> dict:
    """``cardData``, ``library_name``, ``pipeline_tag`` and ``tags`` of the README.md of ``commit``."""
    entry = commit.files.get("README.md")
    card = front_matter(server.store.read_blob(entry.sha256).decode("utf-8", "replace")) if entry else None
    card = card or {}
    library = card.get("library_name") if isinstance(card.get("library_name"), str) else None
    pipeline = card.get("pipeline_tag") if isinstance(card.get("pipeline_tag"), str) else None
    tags: list[str] = []
    derived = [*_strings(card.get("tags")), *_strings(library), *_strings(pipeline)]
    derived += [f"license:{x}" for x in _strings(card.get("license"))]
    derived += [f"dataset:{x}" for x in _strings(card.get("datasets"))]
    derived += [f"base_model:{x}" for x in _strings(card.get("base_model"))]
    for tag in derived:
        if tag not in tags:
            tags.append(tag)
    return {"cardData": card or None, "library_name": library, "pipeline_tag": pipeline, "tags": tags}


def repo_json(server: HubServer, repo: Repo, commit: Commit, *, blobs: bool = False) -> dict:
    """What the Hub tells about ``repo`` at ``commit``."""
    siblings = []
    for path in sorted(commit.files):
        entry = commit.files[path]
        sibling = {"rfilename": path}
        if blobs:
            sibling.update(size=entry.size, blobId=entry.git_oid)
            if entry.lfs:
                sibling["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": 134}
        siblings.append(sibling)
    return {"_id": repo.id, "id": repo.id, "modelId": repo.id, "author": repo.namespace, "sha": commit.oid,
            "private": repo.private, "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0,
            **card_fields(server, commit), "siblings": siblings, "lastModified": commit.date,
            "createdAt": repo.created_at, "usedStorage": 0}


def _flag(query: dict, name: str) -> bool:
    return query.get(name, [""])[0].lower() in ("1", "true")


def _info(server: HubServer, req, m, revision: str | None):
    repo = server.repo(m["type"][:-1], m["ns"], m["name"], server.user(req.headers))
    commit = server.resolve(repo, revision or "main")
    return repo_json(server, repo, commit, blobs=_flag(parse_qs(req.query), "blobs"))


@route("GET", "repo-info", "/api/" + TYPE + "/" + REPO)
def repo_info(server, req, m):
    return _info(server, req, m, None)


@route("GET", "repo-info-rev", "/api/" + TYPE + "/" + REPO + r"/revision/(?P<rev>[^/]+)")
def repo_info_rev(server, req, m):
    return _info(server, req, m, m["rev"])


def _matches(entry: dict, query: dict) -> bool:
    if "search" in query and query["search"][0].lower() not in entry["id"].lower():
        return False
    if "author" in query and entry["author"] != query["author"][0]:
        return False
    if "pipeline_tag" in query and entry["pipeline_tag"] != query["pipeline_tag"][0]:
        return False
    if "gated" in query and bool(entry["gated"]) != _flag(query, "gated"):
        return False
    wanted = query.get("filter", [])
    return all(tag in entry["tags"] or tag in (entry["library_name"], entry["id"]) for tag in wanted)


@route("GET", "repo-list", "/api/" + TYPE)
def list_repos(server: HubServer, req, m):
    query = parse_qs(req.query)
    user = server.user(req.headers)
    try:
        limit = min(int(query.get("limit", [PAGE_LIMIT])[0]), PAGE_LIMIT)
        start = int(query.get("cursor", ["0"])[0])
    except ValueError:
        raise error(400, "limit and cursor must be integers") from None
    if limit < 1 or start < 0:
        raise error(400, "limit must be positive and cursor not negative")
    repo_type = m["type"][:-1]
    with server.store.lock:
        repos = [r for (t, _), r in sorted(server.store.repos.items()) if t == repo_type]
    entries = []
    for repo in repos:
        if not server.store.can_read(user, repo):
            continue
        try:
            entry = repo_json(server, repo, repo.resolve("main"), blobs=_flag(query, "full"))
        except StoreError:  # a repository without a main branch has nothing to list
            continue
        if _matches(entry, query):
            entries.append(entry)
    sort = query.get("sort", [""])[0]
    if sort in ("lastModified", "createdAt"):
        entries.sort(key=lambda e: e[sort], reverse=query.get("direction", ["-1"])[0] != "1")
    expand = query.get("expand", [])
    keys = ("_id", "id", *expand) if expand else LIST_KEYS + (("siblings",) if _flag(query, "full") else ())
    page = [{k: e[k] for k in keys if k in e} for e in entries[start : start + limit]]
    headers = {}
    if start + limit < len(entries):
        following = [(k, v) for k, values in query.items() if k != "cursor" for v in values]
        following.append(("cursor", str(start + limit)))
        host = req.headers.get("Host", server.endpoint.split("//", 1)[1])
        headers["Link"] = f'<http://{host}/api/{m["type"]}?{urlencode(following)}>; rel="next"'
    raise Reply(200, {"_list": page}, headers)
