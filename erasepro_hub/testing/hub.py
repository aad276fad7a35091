"""A local Hugging Face Hub–compatible server for tests and the offline demo.

Standard library + PyYAML, bound to 127.0.0.1 only. It speaks the subset of the
Hub's HTTP API that ``huggingface_hub`` (with Xet disabled) uses to create
repositories, commit (regular and LFS files, copies, pull requests), tag and branch
(and delete both), change visibility and gating, list repositories, read repository
info (card metadata included), trees, refs, commits and paths, and download files by
revision (``refs/pr/N`` included). Tokens map
to users; a user writes to their own namespace and their organisations', and
private repositories are invisible (404) to everybody else.

Writing needs write access at every step, the LFS upload included: its ``PUT``
carries no token (as to the Hub's presigned storage URLs), so the batch endpoint
hands a user with write access a signed upload link, bound to the repository, the
object, its size, the user and an expiry. Uploads stream to disk under a size cap
(``max_upload_bytes``, default :data:`~.blobs.DEFAULT_MAX_UPLOAD_BYTES`; 413 beyond)
and must hash to their oid; other request bodies are read whole up to
``max_request_bytes`` (:data:`DEFAULT_MAX_REQUEST_BYTES`). Commit paths must be
relative and stay inside the repository.

Large files answer ``/resolve`` with a 302 to a second port (a different origin,
as the Hub's CDN is), carrying ``X-Linked-Etag``/``X-Linked-Size``; the storage URL
is signed, so private content is not readable without a valid link.

For tests: :class:`HubServer` keeps a request log (every request names the route
it matched, ``UNKNOWN`` otherwise — a contract test fails on those) and a
:class:`Faults` plan that injects 500s, dropped connections and tampered
downloads at named steps.

The modules: this one (the server, its users and faults, the command line),
:mod:`.wire` (HTTP plumbing), :mod:`.routes_repos` (repositories and reads),
:mod:`.routes_listing` (repository info and listings), :mod:`.routes_manage` (ref deletion, settings),
:mod:`.routes_upload` (uploads, commits, pull requests), :mod:`.store`, :mod:`.records` and :mod:`.blobs`
(storage).

Run it for the offline demo::

    python -m erasepro_hub.testing.hub --root /tmp/hub --port 8765
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import secrets
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode

import yaml

from . import routes_listing, routes_manage, routes_repos, routes_upload  # noqa: F401  (they register the routes)
from .blobs import DEFAULT_MAX_UPLOAD_BYTES
from .store import Repo, Store, StoreError
from .wire import RequestRecord, error, make_handler

__all__ = ["DEFAULT_ORGS", "DEFAULT_USERS", "Faults", "HubServer", "RequestRecord", "main"]

#: The built-in users of the demo server: token → user. The tokens are public test values.
DEFAULT_USERS = {
    "hf_demo_write_token_not_secret": "demo",
    "hf_alice_write_token_not_secret": "alice",
    "hf_bob_write_token_not_secret": "bob",
}
DEFAULT_ORGS = {"erasepro-org": ["alice"]}
#: Cap on an API request body (JSON, a commit's NDJSON with inline files), read whole into memory.
DEFAULT_MAX_REQUEST_BYTES = 64 * 1024 * 1024
#: How long an upload link from the LFS batch endpoint stays valid.
UPLOAD_LINK_SECONDS = 3600


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


class HubServer:
    """The server: an API port and a storage port, both on 127.0.0.1."""

    def __init__(
        self,
        root: str | Path,
        *,
        port: int = 0,
        users: dict | None = None,
        orgs: dict | None = None,
        max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES,
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    ):
        self.store = Store(
            root, users=users or DEFAULT_USERS, orgs=orgs if orgs is not None else DEFAULT_ORGS,
            max_upload_bytes=max_upload_bytes,
        )
        self.max_request_bytes = max_request_bytes
        self.faults = Faults()
        self.requests: list[RequestRecord] = []
        self._secret = secrets.token_bytes(16)
        self.api = ThreadingHTTPServer(("127.0.0.1", port), make_handler(self, api=True))
        self.storage = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self, api=False))
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
            raise error(401, "Invalid credentials in Authorization header", "Unauthorized")
        return self.store.user_for(token)

    def require_user(self, headers) -> str:
        user = self.user(headers)
        if user is None:
            raise error(401, "You must be authenticated to do this: pass a token", "Unauthorized")
        return user

    def repo(self, repo_type: str, ns: str, name: str, user: str | None) -> Repo:
        try:
            return self.store.get(repo_type, f"{unquote(ns)}/{unquote(name)}", user)
        except StoreError as exc:
            raise error(exc.status, str(exc), exc.code) from None

    def writable(self, repo: Repo, user: str) -> None:
        if not self.store.can_write(user, repo.namespace):
            raise error(403, f"You don't have the rights to write to {repo.id}", "Forbidden")

    def resolve(self, repo: Repo, revision: str):
        try:
            return repo.resolve(unquote(revision))
        except StoreError as exc:
            raise error(exc.status, str(exc), exc.code) from None

    # ------------------------------------------------------------------ upload links
    def _upload_signature(self, repo_type: str, repo_id: str, oid: str, size: int, user: str, expires: int) -> str:
        message = "\n".join(["upload", repo_type, repo_id, oid, str(size), user, str(expires)])
        return hmac.new(self._secret, message.encode(), hashlib.sha256).hexdigest()

    def upload_link(self, repo: Repo, oid: str, size: int, user: str) -> str:
        """The URL where ``user`` (who has write access) may ``PUT`` LFS object ``oid`` of ``size`` bytes."""
        expires = int(time.time()) + UPLOAD_LINK_SECONDS
        sig = self._upload_signature(repo.type, repo.id, oid, size, user, expires)
        query = urlencode({"size": size, "user": user, "expires": expires, "sig": sig})
        return f"{self.endpoint}/_lfs/{repo.type}s/{repo.id}/{oid}?{query}"

    def uploader(self, req, repo_type: str, ns: str, name: str, oid: str) -> tuple[Repo, int | None]:
        """The repository an upload ``PUT`` writes to and its announced size (from the link), once the request
        shows write access: a token, or a valid upload link whose user still has write access."""
        if req.headers.get("Authorization"):
            user = self.require_user(req.headers)
            repo = self.repo(repo_type, ns, name, user)
            self.writable(repo, user)
            return repo, None
        params = {key: values[0] for key, values in parse_qs(req.query).items()}
        if "sig" not in params:
            message = "You must be authenticated to upload: pass a token or use the link of the LFS batch endpoint"
            raise error(401, message, "Unauthorized")
        repo_id = f"{unquote(ns)}/{unquote(name)}"
        try:
            size, user, expires = int(params["size"]), params["user"], int(params["expires"])
        except (KeyError, ValueError):
            raise error(401, "invalid upload link", "Unauthorized") from None
        expected = self._upload_signature(repo_type, repo_id, oid, size, user, expires)
        if not hmac.compare_digest(params["sig"], expected):
            raise error(401, "invalid upload link", "Unauthorized")
        if expires < time.time():
            raise error(401, "expired upload link: ask the LFS batch endpoint for a new one", "Unauthorized")
        repo = self.repo(repo_type, ns, name, user)
        self.writable(repo, user)  # rights can change after the link was handed out
        return repo, size

    def url_for(self, repo: Repo) -> str:
        prefix = "" if repo.type == "model" else f"{repo.type}s/"
        return f"{self.endpoint}/{prefix}{repo.id}"



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m erasepro_hub.testing.hub",
        description="A local Hub-compatible server (127.0.0.1 only) for the offline demo and tests.",
    )
    parser.add_argument("--root", required=True, help="folder that holds the repositories (created if missing)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument(
        "--max-upload-mb", type=int, default=DEFAULT_MAX_UPLOAD_BYTES // (1024 * 1024),
        help="largest object one LFS upload may store, in MiB (default: %(default)s)",
    )
    parser.add_argument("--users", help="YAML file {tokens: {token: user}, orgs: {org: [users]}} (default: demo users)")
    args = parser.parse_args(argv)
    users, orgs = DEFAULT_USERS, DEFAULT_ORGS
    if args.users:
        data = yaml.safe_load(Path(args.users).read_text()) or {}
        users, orgs = data.get("tokens", {}), data.get("orgs", {})
    server = HubServer(
        args.root, port=args.port, users=users, orgs=orgs, max_upload_bytes=args.max_upload_mb * 1024 * 1024
    ).start()
    print(f"local hub at {server.endpoint} (storage {server.storage_endpoint}), root {args.root}", file=sys.stderr)
    print(server.endpoint, flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        server.stop()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
