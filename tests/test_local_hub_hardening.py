"""The local Hub refuses what the real Hub refuses: hostile uploads and commits, sent as raw HTTP.

Each test builds the requests itself (``http.client``), so the client library's own checks are not
what is being tested: LFS uploads need write access to the repository, are streamed to disk under a
size cap and must hash to the announced oid; commit paths may not leave the repository.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import itertools
import json
import os
from urllib.parse import urlsplit

import pytest

from conftest import TOKENS

_names = itertools.count()


def _call(hub, method: str, url: str, body=b"", token: str | None = None, headers: dict | None = None):
    """One request on a fresh connection: (status, headers, parsed JSON body or raw bytes)."""
    split = urlsplit(url if "://" in url else hub.endpoint + url)
    conn = http.client.HTTPConnection(split.hostname, split.port, timeout=10)
    sent = dict(headers or {})
    if token:
        sent["Authorization"] = f"Bearer {token}"
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    target = split.path + (f"?{split.query}" if split.query else "")
    try:
        conn.request(method, target, body=body, headers=sent)
        response = conn.getresponse()
        raw = response.read()
    finally:
        conn.close()
    try:
        payload = json.loads(raw) if raw else {}
    except ValueError:
        payload = raw
    return response.status, response.headers, payload


def _new_repo(hub, *, private: bool, owner: str = "alice") -> str:
    name = f"hardening-{next(_names)}"
    status, _, body = _call(
        hub, "POST", "/api/repos/create", {"name": name, "visibility": "private" if private else "public"},
        token=TOKENS[owner],
    )
    assert status == 200, body
    return f"{owner}/{name}"


def _batch(hub, repo_id: str, objects: list[dict], token: str | None):
    body = {"operation": "upload", "transfers": ["basic"], "objects": objects, "hash_algo": "sha256"}
    return _call(hub, "POST", f"/{repo_id}.git/info/lfs/objects/batch", body, token=token,
                 headers={"Accept": "application/vnd.git-lfs+json"})


def _upload_href(hub, repo_id: str, oid: str, size: int) -> str:
    """The upload URL the batch endpoint hands out to the repository's owner."""
    status, _, body = _batch(hub, repo_id, [{"oid": oid, "size": size}], TOKENS["alice"])
    assert status == 200, body
    return body["objects"][0]["actions"]["upload"]["href"]


def _leftovers(hub) -> list[str]:
    """Temporary files in the blob store (a refused upload must not leave any)."""
    return sorted(p.name for p in hub.store.blob_dir.iterdir() if p.name.startswith("."))


def _nothing_stored(hub, repo_id: str, *shas: str) -> None:
    repo = hub.store.repos[("model", repo_id)]
    for sha in shas:
        assert not hub.store.has_blob(sha), f"blob {sha} was stored"
        assert sha not in repo.lfs_objects, f"{sha} was recorded as an LFS object of {repo_id}"
    assert not _leftovers(hub), _leftovers(hub)


# ----------------------------------------------------------------------------- who may upload
def test_lfs_uploads_need_write_access_to_the_repository(hub):
    repo_id = _new_repo(hub, private=True)
    data = os.urandom(2048)
    sha = hashlib.sha256(data).hexdigest()
    put = f"/_lfs/models/{repo_id}/{sha}"

    # no token at all: refused before anything is read or stored
    status, headers, body = _call(hub, "PUT", put, data)
    assert status == 401, body
    _nothing_stored(hub, repo_id, sha)
    # a forged upload signature is no better than none
    status, _, body = _call(hub, "PUT", f"{put}?size={len(data)}&user=alice&expires=9999999999&sig={'0' * 64}", data)
    assert status == 401, body
    _nothing_stored(hub, repo_id, sha)
    # an invalid token
    status, _, body = _call(hub, "PUT", put, data, token="hf_not_a_valid_token")
    assert status == 401, body
    # another user: the private repository stays invisible, as it does for commits
    status, _, body = _call(hub, "PUT", put, data, token=TOKENS["bob"])
    assert status == 404, body
    _nothing_stored(hub, repo_id, sha)
    # the batch and verify steps need the same rights
    assert _batch(hub, repo_id, [{"oid": sha, "size": len(data)}], None)[0] == 401
    assert _call(hub, "POST", f"/_lfs/models/{repo_id}/verify", {"oid": sha, "size": len(data)})[0] == 401

    # on a public repository, somebody without write access is told so
    public = _new_repo(hub, private=False)
    status, _, body = _call(hub, "PUT", f"/_lfs/models/{public}/{sha}", data, token=TOKENS["bob"])
    assert status == 403, body
    verify = {"oid": sha, "size": len(data)}
    assert _call(hub, "POST", f"/_lfs/models/{public}/verify", verify, token=TOKENS["bob"])[0] == 403
    _nothing_stored(hub, public, sha)

    # the owner's upload, through the URL the batch endpoint handed out, is stored and verifies
    href = _upload_href(hub, repo_id, sha, len(data))
    status, _, body = _call(hub, "PUT", href, data)
    assert status == 200, body
    assert hub.store.has_lfs(hub.store.repos[("model", repo_id)], sha, len(data))
    assert _call(hub, "POST", f"/_lfs/models/{repo_id}/verify", verify, token=TOKENS["alice"])[0] == 200
    # the handed-out URL is bound to its object: it does not upload something else
    other = os.urandom(2048)
    other_href = href.replace(sha, hashlib.sha256(other).hexdigest())
    assert _call(hub, "PUT", other_href, other)[0] == 401
    _nothing_stored(hub, repo_id, hashlib.sha256(other).hexdigest())


# ----------------------------------------------------------------------------- how much
def test_an_upload_over_the_size_cap_is_refused_and_leaves_nothing(hub, monkeypatch):
    repo_id = _new_repo(hub, private=True)
    data = os.urandom(4096)
    sha = hashlib.sha256(data).hexdigest()

    monkeypatch.setattr(hub.store, "max_upload_bytes", 1024, raising=False)
    # announced over the cap: the batch hands out no upload URL
    status, _, body = _batch(hub, repo_id, [{"oid": sha, "size": len(data)}], TOKENS["alice"])
    assert status == 413, body
    assert "1024" in body["error"] and "too large" in body["error"]
    _nothing_stored(hub, repo_id, sha)

    # announced under the cap, then more is sent: refused whether the length is declared or streamed
    monkeypatch.setattr(hub.store, "max_upload_bytes", 1 << 20)
    href = _upload_href(hub, repo_id, sha, len(data))
    monkeypatch.setattr(hub.store, "max_upload_bytes", 1024)
    status, _, body = _call(hub, "PUT", href, data)
    assert status == 413, body
    assert "too large" in body["error"]
    _nothing_stored(hub, repo_id, sha)
    chunks = [data[i : i + 512] for i in range(0, len(data), 512)]
    status, _, body = _call(hub, "PUT", href, iter(chunks))  # no length: sent chunked
    assert status == 413, body
    _nothing_stored(hub, repo_id, sha)

    # the server still answers normally afterwards, and an upload within the cap goes through
    small = os.urandom(1000)
    small_sha = hashlib.sha256(small).hexdigest()
    status, _, body = _call(hub, "PUT", _upload_href(hub, repo_id, small_sha, len(small)), small)
    assert status == 200, body
    assert hub.store.has_lfs(hub.store.repos[("model", repo_id)], small_sha, len(small))


# ----------------------------------------------------------------------------- what
def test_an_upload_must_hash_to_the_announced_oid(hub):
    repo_id = _new_repo(hub, private=False)
    announced = os.urandom(2048)
    sent = os.urandom(2048)
    sha, sent_sha = hashlib.sha256(announced).hexdigest(), hashlib.sha256(sent).hexdigest()

    # an announced oid that is not a sha256, or a size that is not one, is a bad request (not a server error)
    for obj in ({"oid": "not-a-sha256", "size": 10}, {"oid": "../../etc/passwd", "size": 10},
                {"oid": sha.upper(), "size": 10}, {"oid": sha, "size": -1}, {"oid": sha, "size": "big"}):
        status, _, body = _batch(hub, repo_id, [obj], TOKENS["alice"])
        assert status == 400, (obj, status, body)

    href = _upload_href(hub, repo_id, sha, len(announced))
    status, _, body = _call(hub, "PUT", href, sent)
    assert status == 400, body
    assert sha in body["error"]
    _nothing_stored(hub, repo_id, sha, sent_sha)
    status, _, body = _call(hub, "PUT", href, iter([sent[:1000], sent[1000:]]))  # no length: sent chunked
    assert status == 400, body
    _nothing_stored(hub, repo_id, sha, sent_sha)
    # a size other than the announced one is refused too
    status, _, body = _call(hub, "PUT", href, announced + b"x")
    assert status == 400, body
    _nothing_stored(hub, repo_id, sha)


# ----------------------------------------------------------------------------- where
def _commit(hub, repo_id: str, operations: list[dict]):
    lines = [{"key": "header", "value": {"summary": "hostile", "description": ""}}, *operations]
    body = "\n".join(json.dumps(line) for line in lines).encode()
    return _call(hub, "POST", f"/api/models/{repo_id}/commit/main", body, token=TOKENS["alice"],
                 headers={"Content-Type": "application/x-ndjson"})


def _file(path: str, content: bytes = b"hello\n") -> dict:
    return {"key": "file", "value": {"path": path, "content": base64.b64encode(content).decode(), "encoding": "base64"}}


BAD_PATHS = [
    "../x", "/etc/x", "a//b", "a/../../b", "a/..", "..", "./x", "a/./b",
    "a\\b", "..\\x", "a\0b", "a\nb", "", "/", "a/", ".git/config",
]


@pytest.fixture(scope="module")
def commit_repo(hub):
    return _new_repo(hub, private=False)


@pytest.mark.parametrize("path", BAD_PATHS, ids=repr)
def test_commit_paths_may_not_leave_the_repository(hub, commit_repo, path):
    repo = hub.store.repos[("model", commit_repo)]
    head, count = repo.branches["main"], len(repo.commits)
    status, _, body = _commit(hub, commit_repo, [_file("fine.txt"), _file(path)])
    assert status == 400, body
    assert repr(path) in body["error"], body
    assert repo.branches["main"] == head and len(repo.commits) == count  # nothing was committed


def test_every_commit_operation_has_its_path_checked(hub, commit_repo):
    repo = hub.store.repos[("model", commit_repo)]
    for key in ("deletedFile", "deletedFolder", "lfsFile"):
        head, count = repo.branches["main"], len(repo.commits)
        value = {"path": "../.gitattributes"}
        if key == "lfsFile":
            value.update(algo="sha256", oid="0" * 64, size=1)
        status, _, body = _commit(hub, commit_repo, [{"key": key, "value": value}])
        assert status == 400, (key, body)
        assert repr("../.gitattributes") in body["error"], body
        assert repo.branches["main"] == head and len(repo.commits) == count

    # ordinary paths (dots inside names, hidden files, spaces, non-ASCII, a folder deletion) still commit
    ordinary = [_file("docs/notes.md"), _file("a.b/c..d/.hidden"), _file("x y/é.txt")]
    status, _, body = _commit(hub, commit_repo, ordinary)
    assert status == 200, body
    assert {"docs/notes.md", "a.b/c..d/.hidden", "x y/é.txt"} <= set(repo.commits[body["commitOid"]].files)
    status, _, body = _commit(hub, commit_repo, [{"key": "deletedFolder", "value": {"path": "docs/"}}])
    assert status == 200, body
    assert "docs/notes.md" not in repo.commits[body["commitOid"]].files
