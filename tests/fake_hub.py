"""A loopback fake of the Hugging Face Hub HTTP API, so tests can push to and read from "the Hub" offline.

`FakeHub` serves 127.0.0.1 on an ephemeral port from a daemon thread and keeps a git-like history in memory:
per repo, commits that each hold a full snapshot of the file tree, and branches pointing at them. It answers
what huggingface_hub (2.x) sends for

- writing: `create_repo`, `create_branch`, `create_commit` / `upload_file` / `upload_folder`. As on the Hub,
  preupload answers `uploadMode: "lfs"` for binary files (a NUL byte in the sample, or a `.gitattributes` LFS
  pattern such as `*.safetensors`) and files of 10 MB or more, and `"regular"` for the rest: regular files
  travel base64-encoded in the NDJSON commit payload; LFS files go through the LFS batch API
  (`/<repo>.git/info/lfs/objects/batch`), a PUT of the object and a verify call, and the commit then names
  them by sha256 (`lfsFile`). Preupload reports the oid of files already there (sha256 for LFS, git oid for
  regular files), so the client drops unchanged files and skips commits that change nothing. A commit whose
  `parentCommit` is not the branch head is refused with 412. README metadata validation (`validate-yaml`)
  checks the `model-index` schema; `add_collection_item`.
  Xet, as huggingface_hub uses it whenever `hf_xet` is installed: the read and write token endpoints
  (`/api/<type>s/<id>/xet-{read,write}-token/<rev>`) hand out a short-lived token and the URL of the CAS
  server, `<hub>/cas`, which takes xorbs (`POST /v1/xorbs/default/<hash>`) and shards (`POST /v1/shards`),
  answers reconstructions (`GET /v1/reconstructions/<file hash>`, with a byte Range) and serves xorb byte
  ranges from the signed URLs it gives (`fake_xet.py` reads the formats). A shard's files are rebuilt from
  their xorbs and checked against their sha256, so a commit names them by sha256 as LFS files; `resolve`
  answers `X-Xet-Hash` and the `xet-auth` link for them and `tree` their `xetHash`, so downloads go through
  the CAS too. Not served: global deduplication (`GET /v1/chunks/...` answers 404, so a client deduplicates
  against its own shard cache), and the newer endpoints hf_xet tries first and falls back from with 404
  (`/v2/shards`, `/v2/reconstructions`, `/v1/xorb-grants`). `FakeHub(xet=False)` is a Hub without Xet:
  its clients set HF_HUB_DISABLE_XET=1 (`client_env` and `point_hub_client_at` do) and upload through LFS;
- reading: `list_repo_commits`, `list_repo_refs`, `model_info` / `repo_info` (with siblings),
  `list_repo_tree`, `hf_hub_download` and `snapshot_download` (the resolve endpoint with ETag,
  X-Repo-Commit and Content-Length).

Tests inspect the result directly (`titles`, `commits`, `files`, `commit_by_title`, `collections`, `requests`,
`failed_requests`, the CAS's `cas` and `xet_hashes`)
and can make endpoints fail or slow (`fail`, `delay`), add latency to every request and cap upload
bandwidth (`latency_s`, `upload_bytes_per_s`), or refuse connections altogether (`refuse_connections`,
`accept_connections`: the port is closed, then served again). Writes need `Authorization: Bearer <hub.token>`. Only
namespaced repo ids (`owner/name`) are supported.

huggingface_hub reads HF_ENDPOINT (and HF_HUB_OFFLINE, HF_HUB_CACHE) once, at import. Two ways to point a
client at the fake:

- in this process: the `fake_hub` fixture (or `point_hub_client_at`) patches those constants and the
  environment for the duration of a test;
- in a subprocess: pass `hub.client_env(cache_dir)` as the environment (and drop HF_HUB_OFFLINE).

Run `python tests/fake_hub.py` to serve one by hand (it prints the environment to export).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from fake_xet import XetFormatError, XetStore

FAKE_USER = "fake-user"
FAKE_TOKEN = "hf_fake_hub_token_for_tests"
MAX_BODY_BYTES = 1 << 30  # refuse anything larger: a test bug, not a real upload
IDLE_CONNECTION_TIMEOUT_S = 30.0  # keep-alive connections idle this long are closed
DEFAULT_LIFETIME_S = 900.0  # the server shuts itself down after this, even if nobody stops it
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
INITIAL_COMMIT_TITLE = "initial commit"
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
    b"*.pt filter=lfs diff=lfs merge=lfs -text\n*.arrow filter=lfs diff=lfs merge=lfs -text\n"
)
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".arrow")  # the patterns above
LFS_MIN_SIZE = 10 * 1000 * 1000  # the Hub stores files from 10 MB on in LFS, whatever their type
CAS_PREFIX = "/cas"  # the Xet CAS server's URL is <hub>/cas
XET_TOKEN_LIFETIME_S = 3600
EXPECTED_MISSES = re.compile(
    rf"/api/agent-harnesses|{CAS_PREFIX}/v1/chunks/.*|{CAS_PREFIX}/v2/(?:shards|reconstructions/.*)"
    rf"|{CAS_PREFIX}/v1/xorb-grants/.*"
)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob: what the Hub reports (and huggingface_hub compares) for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class Commit:
    """One commit: its title (summary), description, parent, and the whole file tree after it."""

    oid: str
    title: str
    description: str
    parent: str | None
    files: Mapping[str, bytes]
    date: datetime
    lfs: frozenset[str] = frozenset()  # paths stored in LFS

    @property
    def message(self) -> str:
        return self.title + (f"\n\n{self.description}" if self.description else "")


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)  # name -> head commit oid

    def resolve(self, revision: str) -> Commit | None:
        """A branch name, a full commit oid, or an unambiguous oid prefix of at least 7 characters."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        if re.fullmatch(r"[0-9a-f]{7,39}", revision):
            found = [c for oid, c in self.commits.items() if oid.startswith(revision)]
            if len(found) == 1:
                return found[0]
        return None

    def history(self, revision: str) -> list[Commit]:
        """Commits reachable from `revision`, newest first (like `git log`)."""
        commit, result = self.resolve(revision), []
        while commit is not None:
            result.append(commit)
            commit = self.commits[commit.parent] if commit.parent else None
        return result


@dataclass
class FailureRule:
    method: str
    path: re.Pattern[str]
    status: int
    message: str
    remaining: int | None  # None: fail every matching request
    commit_title: re.Pattern[str] | None = None
    delay_s: float = 0.0  # with status 0: only slow the request down, then answer normally
    hits: int = 0


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


class FakeHub:
    """An in-memory Hub behind a loopback HTTP server. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        *,
        token: str = FAKE_TOKEN,
        user: str = FAKE_USER,
        lifetime_s: float = DEFAULT_LIFETIME_S,
        xet: bool = True,
    ) -> None:
        self.token, self.user, self.lifetime_s = token, user, lifetime_s
        self.xet = xet  # False: a Hub without Xet, whose clients must set HF_HUB_DISABLE_XET=1 (`client_env`)
        self.cas = XetStore()  # the Xet storage behind the CAS URL the token endpoints hand out
        self.xet_hashes: dict[str, str] = {}  # sha256 -> Xet hash of every file uploaded through Xet
        self._xet_tokens: dict[str, str] = {}  # access token -> "read" or "write"
        self._xet_url_key = secrets.token_bytes(16)  # signs the xorb URLs of reconstructions
        self.repos: dict[tuple[str, str], Repo] = {}
        self.collections: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) in arrival order
        self.failures: list[FailureRule] = []
        self.lfs_objects: dict[str, bytes] = {}  # sha256 -> content, once uploaded and verified
        self._uploaded_lfs: dict[str, bytes] = {}  # PUT but not yet verified
        self.latency_s = 0.0  # added to every request
        self.upload_bytes_per_s: float | None = None  # caps the speed of request bodies (uploads)
        self._lock = threading.RLock()
        self._clock = datetime(2025, 1, 1, tzinfo=timezone.utc)
        self._server: ThreadingHTTPServer | None = None
        self._url: str | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None

    # --- lifecycle ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port> (kept after stop(): a closed port, handy for "unreachable" tests)."""
        if self._url is None:
            raise RuntimeError("FakeHub was never started: call start() first")
        return self._url

    def start(self) -> FakeHub:
        self._serve(0)
        self._timer = threading.Timer(self.lifetime_s, self.stop)
        self._timer.daemon = True
        self._timer.start()
        return self

    def _serve(self, port: int) -> None:
        handler = type("FakeHubHandler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", port), handler)  # allow_reuse_address: same port
        self._server.daemon_threads = True
        host, port = self._server.server_address[:2]
        self._url = f"http://{host}:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, name="fake-hub", daemon=True
        )
        self._thread.start()

    def refuse_connections(self) -> None:
        """Close the port: connections are refused (the state is kept) until `accept_connections`."""
        self._close_server()

    def accept_connections(self) -> None:
        """Serve again on the same port after `refuse_connections`."""
        if self._server is None:
            self._serve(int(self.url.rsplit(":", 1)[1]))

    def _close_server(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def stop(self) -> None:
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        self._close_server()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client_env(self, cache_dir: str | os.PathLike[str]) -> dict[str, str]:
        """Environment for a huggingface_hub client process talking to this hub (drop HF_HUB_OFFLINE too)."""
        return {
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token,
            "HF_HUB_CACHE": str(cache_dir),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            # Xet's local state (its shard cache, which deduplicates uploads) beside the Hub cache.
            "HF_XET_CACHE": str(Path(cache_dir) / "xet"),
            **({} if self.xet else {"HF_HUB_DISABLE_XET": "1"}),
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }

    # --- setting up and inspecting state ------------------------------------------------------------------

    def create_repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            key = (repo_type, repo_id)
            if key in self.repos:
                return self.repos[key]
            repo = Repo(repo_type, repo_id)
            initial = self._new_commit(
                repo, None, INITIAL_COMMIT_TITLE, "", {".gitattributes": GITATTRIBUTES}
            )
            repo.branches["main"] = initial.oid
            self.repos[key] = repo
            return repo

    def add_collection(self, slug: str, title: str = "Test collection") -> None:
        with self._lock:
            self.collections[slug] = {"slug": slug, "title": title, "items": []}

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            try:
                return self.repos[(repo_type, repo_id)]
            except KeyError:
                known = ", ".join(f"{t}:{i}" for t, i in self.repos) or "none"
                raise KeyError(f"No {repo_type} repo '{repo_id}' on the fake Hub (repos: {known})") from None

    def commits(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[Commit]:
        """Commits reachable from `revision`, oldest first."""
        repo = self.repo(repo_id, repo_type)
        with self._lock:
            if repo.resolve(revision) is None:
                raise KeyError(f"No revision '{revision}' in '{repo_id}' (branches: {sorted(repo.branches)})")
            return list(reversed(repo.history(revision)))

    def titles(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        return [c.title for c in self.commits(repo_id, revision, repo_type)]

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        return dict(self.commits(repo_id, revision, repo_type)[-1].files)

    def commit_by_title(self, repo_id: str, revision: str, title: str, repo_type: str = "model") -> Commit:
        found = [c for c in self.commits(repo_id, revision, repo_type) if c.title == title]
        if len(found) != 1:
            raise KeyError(f"{len(found)} commits titled {title!r} on {repo_id}@{revision}, expected 1")
        return found[0]

    def failed_requests(self) -> list[tuple[str, str, int]]:
        """Requests answered with an error, except the negative answers clients ask for as part of the
        protocol: no deduplication information for a chunk, and the newer Xet endpoints (`/v2/...`, upload
        grants) the client tries first and falls back from; and huggingface_hub's telemetry registry."""
        with self._lock:
            return [r for r in self.requests if r[2] >= 400 and not EXPECTED_MISSES.fullmatch(r[1])]

    def fail(
        self,
        path: str,
        *,
        method: str = "POST",
        status: int = 500,
        message: str = "Internal Error - fake Hub failure",
        times: int | None = None,
        commit_title: str | None = None,
    ) -> FailureRule:
        """Answer matching requests with an error: `path` is a regex searched in the request path;
        `commit_title` (regex) restricts a commit-endpoint rule to commits with that title; `times=None`
        fails forever."""
        rule = FailureRule(
            method.upper(),
            re.compile(path),
            status,
            message,
            times,
            re.compile(commit_title) if commit_title is not None else None,
        )
        with self._lock:
            self.failures.append(rule)
        return rule

    def delay(self, path: str, seconds: float, *, method: str = "POST") -> FailureRule:
        """Answer matching requests normally, but only after `seconds` (a slow Hub)."""
        rule = FailureRule(method.upper(), re.compile(path), 0, "", None, delay_s=seconds)
        with self._lock:
            self.failures.append(rule)
        return rule

    def clear_failures(self) -> None:
        with self._lock:
            self.failures.clear()

    # --- internals shared by the handler ------------------------------------------------------------------

    def _new_commit(
        self,
        repo: Repo,
        parent: Commit | None,
        title: str,
        description: str,
        files: dict[str, bytes],
        lfs: frozenset[str] = frozenset(),
    ) -> Commit:
        self._clock += timedelta(seconds=1)  # strictly increasing dates, independent of wall-clock speed
        digest = hashlib.sha1()
        digest.update(json.dumps([repo.repo_id, parent.oid if parent else None, title, description]).encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_oid(files[path])}\0".encode())
        digest.update(str(len(repo.commits)).encode())  # identical content twice is still two commits
        commit = Commit(
            digest.hexdigest(),
            title,
            description,
            parent.oid if parent else None,
            MappingProxyType(dict(files)),
            self._clock,
            frozenset(p for p in lfs if p in files),
        )
        repo.commits[commit.oid] = commit
        return commit


def model_index_errors(model_index: Any) -> list[str]:
    """What the Hub's metadata validation says about a `model-index` (empty when it is valid or absent)."""
    if model_index is None:
        return []
    if not isinstance(model_index, list) or not model_index:
        return ['"model-index" must be a non-empty array']
    errors = []
    for i, model in enumerate(model_index):
        if not isinstance(model, dict) or not isinstance(model.get("name"), str):
            errors.append(f'"model-index[{i}].name" is required')
            continue
        results = model.get("results")
        if not isinstance(results, list):
            errors.append(f'"model-index[{i}].results" must be an array')
            continue
        for j, result in enumerate(results):
            where = f"model-index[{i}].results[{j}]"
            task, dataset = result.get("task") or {}, result.get("dataset") or {}
            if not isinstance(task.get("type"), str):
                errors.append(f'"{where}.task.type" is required')
            if not isinstance(dataset.get("type"), str) or not isinstance(dataset.get("name"), str):
                errors.append(f'"{where}.dataset" needs "type" and "name"')
            metrics = result.get("metrics")
            if not isinstance(metrics, list) or not metrics:
                errors.append(f'"{where}.metrics" must be a non-empty array')
                continue
            for k, metric in enumerate(metrics):
                if not isinstance(metric.get("type"), str) or "value" not in metric:
                    errors.append(f'"{where}.metrics[{k}]" needs "type" and "value"')
    return errors


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's client expects
    timeout = IDLE_CONNECTION_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read hub.requests instead
        pass

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # --- plumbing -----------------------------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        self.raw_path, self.query = split.path, parse_qs(split.query)
        status = 500
        try:
            started = time.perf_counter()
            body = self._read_body()
            rate = self.hub.upload_bytes_per_s
            # A slow link: the request takes at least the latency plus its upload time at `rate`.
            wait = self.hub.latency_s + (len(body) / rate if rate else 0.0) - (time.perf_counter() - started)
            if wait > 0:
                time.sleep(wait)
            self._check_failures(method, body)
            status = self._route(method, body)
        except _HttpError as error:
            status = error.status
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.code:
                headers["X-Error-Code"] = error.code
            payload = {"error": error.message, **error.extra}
            self._send_json(error.status, payload, headers, head=method == "HEAD")
        except Exception as error:  # a bug in the fake or a malformed request: say so
            status = 500
            with contextlib.suppress(OSError):
                self._send_json(500, {"error": f"fake Hub error: {error!r}"}, head=method == "HEAD")
        finally:
            with self.hub._lock:
                self.hub.requests.append((method, unquote(self.raw_path), status))

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                total += size
                if total > MAX_BODY_BYTES:
                    raise _HttpError(413, "Request body too large for the fake Hub")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise _HttpError(413, "Request body too large for the fake Hub")
        return self.rfile.read(length) if length else b""

    def _check_failures(self, method: str, body: bytes) -> None:
        path = unquote(self.raw_path)
        title = None
        if method == "POST" and "/commit/" in path and body:
            with contextlib.suppress(ValueError, KeyError, IndexError):
                title = json.loads(body.split(b"\n", 1)[0])["value"]["summary"]
        delay = 0.0
        with self.hub._lock:
            for rule in self.hub.failures:
                if rule.method != method or not rule.path.search(path):
                    continue
                if rule.commit_title is not None and (title is None or not rule.commit_title.search(title)):
                    continue
                if rule.remaining is not None:
                    if rule.remaining <= 0:
                        continue
                    rule.remaining -= 1
                rule.hits += 1
                if rule.status == 0:
                    delay += rule.delay_s
                    continue
                raise _HttpError(rule.status, rule.message)
        if delay:
            time.sleep(delay)  # outside the lock: other requests go on meanwhile

    def _send(self, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Any, headers: dict | None = None, head: bool = False) -> None:
        self._send(
            status,
            json.dumps(payload).encode(),
            {"Content-Type": "application/json", **(headers or {})},
            head=head,
        )

    def _json(self, body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except ValueError as error:
            raise _HttpError(400, f"Invalid JSON body: {error}") from error

    def _require_token(self) -> None:
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _repo(self, type_segment: str, repo_id: str) -> Repo:
        repo = self.hub.repos.get((REPO_TYPES[type_segment], repo_id))
        if repo is None:
            raise _HttpError(404, f"Repository Not Found for url: {self.path}.", "RepoNotFound")
        return repo

    def _commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    # --- routes -------------------------------------------------------------------------------------------

    API_REPO = re.compile(
        r"^/api/(?P<type>models|datasets|spaces)/(?P<id>[^/]+/[^/]+)"
        r"(?:/(?P<op>preupload|commit|branch|commits|revision|tree|refs|xet-read-token|xet-write-token)"
        r"(?:/(?P<rest>.*))?)?$"
    )
    LFS_BATCH = re.compile(
        r"^/(?:(?P<type>dataset|space)s/)?(?P<id>[^/]+/[^/]+)\.git/info/lfs/objects/batch$"
    )
    RESOLVE = re.compile(
        r"^/(?:(?P<type>datasets|spaces)/)?(?P<id>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"
    )

    def _route(self, method: str, body: bytes) -> int:
        path = self.raw_path
        with self.hub._lock:
            if path == "/api/repos/create" and method == "POST":
                return self._create_repo(self._json(body))
            if path == "/" and method in ("GET", "HEAD"):  # the home page: what a reachability probe asks
                self._send(200, b"fake Hub", {"Content-Type": "text/plain"}, head=method == "HEAD")
                return 200
            if path == "/api/validate-yaml" and method == "POST":
                return self._validate_yaml(self._json(body))
            if (lfs := self.LFS_BATCH.fullmatch(path)) and method == "POST":
                self._require_token()
                return self._lfs_batch(self._repo(f"{lfs['type'] or 'model'}s", lfs["id"]), self._json(body))
            if (upload := re.fullmatch(r"/lfs-objects/(?P<oid>[0-9a-f]{64})", path)) and method == "PUT":
                return self._lfs_put(upload["oid"], body)
            if path == "/lfs-verify" and method == "POST":
                self._require_token()
                return self._lfs_verify(self._json(body))
            if path == "/api/agent-harnesses":
                # huggingface_hub's telemetry registry: a 404 makes the client skip it without caching
                # an answer in the real HF_HOME.
                raise _HttpError(404, "Not served by the fake Hub")
            if path == "/api/whoami-v2" and method == "GET":
                return self._whoami()
            items = re.fullmatch(r"/api/collections/(?P<slug>.+)/items", path)
            if items and method == "POST":
                return self._add_collection_item(unquote(items["slug"]), self._json(body))
            collection = re.fullmatch(r"/api/collections/(?P<slug>.+)", path)
            if collection and not items and method == "GET":
                return self._ok(self._collection_json(self._collection(unquote(collection["slug"]))))
            if match := self.API_REPO.fullmatch(path):
                return self._repo_api(method, match, body)
            if path.startswith(CAS_PREFIX + "/") and self.hub.xet:
                return self._cas(method, path[len(CAS_PREFIX) :], body)
            if (match := self.RESOLVE.fullmatch(path)) and method in ("GET", "HEAD"):
                repo = self._repo(f"{match['type'] or 'model'}s", match["id"])
                return self._resolve(repo, unquote(match["rev"]), unquote(match["path"]), method == "HEAD")
        raise _HttpError(404, f"The fake Hub does not implement {method} {path}")

    def _ok(self, payload: Any) -> int:
        self._send_json(200, payload)
        return 200

    def _repo_api(self, method: str, match: re.Match[str], body: bytes) -> int:
        op, rest = match["op"], unquote(match["rest"] or "")
        repo = self._repo(match["type"], match["id"])
        if op is None and method == "GET":
            return self._ok(self._info(repo, self._commit_at(repo, "main")))
        if op == "revision" and method == "GET":
            return self._ok(self._info(repo, self._commit_at(repo, rest)))
        if op == "commits" and method == "GET":
            return self._ok([self._commit_json(c) for c in self._history(repo, rest or "main")])
        if op == "refs" and method == "GET":
            return self._ok(self._refs(repo))
        if op == "tree" and method == "GET":
            revision, _, prefix = (match["rest"] or "").partition("/")
            return self._tree(repo, unquote(revision), unquote(prefix))
        if op == "branch" and method == "POST":
            self._require_token()
            return self._create_branch(repo, rest, self._json(body))
        if op == "branch" and method == "DELETE":
            self._require_token()
            if rest not in repo.branches or rest == "main":
                raise _HttpError(404 if rest not in repo.branches else 403, f"Cannot delete branch {rest}")
            del repo.branches[rest]
            return self._ok({})
        if op == "preupload" and method == "POST":
            self._require_token()
            return self._preupload(repo, rest, self._json(body))
        if op == "commit" and method == "POST":
            self._require_token()
            return self._commit(repo, rest, body)
        if op in ("xet-read-token", "xet-write-token") and method == "GET" and self.hub.xet:
            return self._xet_token(repo, "write" if op == "xet-write-token" else "read", rest)
        raise _HttpError(404, f"The fake Hub does not implement {method} {self.raw_path}")

    # --- write endpoints ----------------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> int:
        self._require_token()
        repo_type = payload.get("type") or "model"
        if repo_type not in REPO_TYPES.values():
            raise _HttpError(400, f"Invalid repo type '{repo_type}'")
        name = payload.get("name")
        if not name or "/" in name:
            raise _HttpError(400, f"Invalid repo name {name!r}")
        repo_id = f"{payload.get('organization') or self.hub.user}/{name}"
        url = f"{self.hub.url}/{'' if repo_type == 'model' else repo_type + 's/'}{repo_id}"
        if (repo_type, repo_id) in self.hub.repos:
            raise _HttpError(409, f"You already created this {repo_type} repo", extra={"url": url})
        self.hub.create_repo(repo_id, repo_type)
        return self._ok({"url": url, "name": repo_id, "id": hashlib.sha1(repo_id.encode()).hexdigest()[:24]})

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> int:
        if not branch:
            raise _HttpError(400, "Missing branch name")
        if branch in repo.branches:
            raise _HttpError(409, "Reference already exists")
        start = self._commit_at(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        return self._ok({})

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> int:
        head = self._commit_at(repo, revision)
        files = payload.get("files")
        if not isinstance(files, list):
            raise _HttpError(400, "preupload: 'files' must be a list")
        answer = []
        for entry in files:
            existing = head.files.get(entry["path"])
            sample = base64.b64decode(entry.get("sample") or "")
            lfs = (
                entry["path"].endswith(LFS_SUFFIXES)
                or int(entry.get("size") or 0) >= LFS_MIN_SIZE
                or b"\0" in sample
            )
            if existing is None:
                oid = None
            else:
                oid = hashlib.sha256(existing).hexdigest() if lfs else git_blob_oid(existing)
            answer.append(
                {
                    "path": entry["path"],
                    "uploadMode": "lfs" if lfs else "regular",
                    "shouldIgnore": False,
                    "oid": oid,
                }
            )
        return self._ok({"files": answer, "commitOid": head.oid})

    def _commit(self, repo: Repo, branch: str, body: bytes) -> int:
        if self.query.get("create_pr"):
            raise _HttpError(400, "The fake Hub does not support pull requests")
        if branch not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {branch} (commits go to branches)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "Commit payload must start with a 'header' line")
        header = lines[0]["value"]
        head = repo.commits[repo.branches[branch]]
        if header.get("parentCommit") and header["parentCommit"] != head.oid:
            raise _HttpError(412, f"Parent commit {header['parentCommit']} is not the head of {branch}")
        files, lfs = dict(head.files), set(head.lfs)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if key == "file":
                if value.get("encoding") != "base64":
                    raise _HttpError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                files[path] = base64.b64decode(value["content"])
                lfs.discard(path)
            elif key == "lfsFile":
                content = self.hub.lfs_objects.get(value.get("oid", ""))
                if content is None:
                    raise _HttpError(400, f"LFS object {value.get('oid')} for {path} was never uploaded")
                files[path] = content
                lfs.add(path)
            elif key == "deletedFile":
                if path not in files:
                    raise _HttpError(404, f"A file with this name doesn't exist: {path}")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [n for n in files if n.startswith(prefix)]:
                    del files[name]
            else:
                raise _HttpError(400, f"The fake Hub does not support '{key}' commit operations")
        commit = self.hub._new_commit(
            repo, head, header.get("summary", ""), header.get("description", ""), files, frozenset(lfs)
        )
        repo.branches[branch] = commit.oid
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        return self._ok(
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{self.hub.url}/{prefix}{repo.repo_id}/commit/{commit.oid}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def _lfs_batch(self, repo: Repo, payload: dict) -> int:
        if payload.get("operation") != "upload":
            raise _HttpError(400, "The fake Hub's LFS batch API only uploads")
        objects = []
        for obj in payload.get("objects") or []:
            oid, size = obj.get("oid"), obj.get("size")
            if (
                not isinstance(oid, str)
                or not re.fullmatch(r"[0-9a-f]{64}", oid)
                or not isinstance(size, int)
            ):
                raise _HttpError(422, f"Malformed LFS object {obj!r}")
            answer: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.hub.lfs_objects:  # known objects need no upload, as on the Hub
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs-objects/{oid}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs-verify", "header": {}},
                }
            objects.append(answer)
        self._send_json(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"})
        return 200

    def _lfs_put(self, oid: str, body: bytes) -> int:
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HttpError(400, f"Uploaded content does not match LFS object {oid}")
        self.hub._uploaded_lfs[oid] = body
        return self._ok({})

    def _lfs_verify(self, payload: dict) -> int:
        oid = payload.get("oid", "")
        content = self.hub._uploaded_lfs.get(oid, self.hub.lfs_objects.get(oid))
        if content is None or len(content) != payload.get("size"):
            raise _HttpError(404, f"LFS object {oid} of size {payload.get('size')} was not uploaded")
        self.hub.lfs_objects[oid] = content
        return self._ok({"success": True})

    # --- Xet: tokens and the CAS server (xorbs, shards, reconstructions) -----------------------------------

    def _xet_token(self, repo: Repo, mode: str, revision: str) -> int:
        """A short-lived token for the CAS server, with its URL: as the Hub answers, in headers and JSON."""
        if mode == "write":
            self._require_token()
            if revision and revision != "None" and revision not in repo.branches:
                raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        token = f"xet_{mode}_{secrets.token_hex(12)}"
        self.hub._xet_tokens[token] = mode
        expires = int(time.time()) + XET_TOKEN_LIFETIME_S
        cas_url = self.hub.url + CAS_PREFIX
        headers = {
            "X-Xet-Cas-Url": cas_url,
            "X-Xet-Access-Token": token,
            "X-Xet-Token-Expiration": str(expires),
        }
        self._send_json(200, {"casUrl": cas_url, "accessToken": token, "exp": expires}, headers)
        return 200

    def _require_xet_token(self, mode: str) -> None:
        granted = self.hub._xet_tokens.get(self.headers.get("Authorization", "").removeprefix("Bearer "))
        if granted is None or (mode == "write" and granted != "write"):
            raise _HttpError(401, f"A Xet {mode} token is required")

    def _xorb_url(self, xorb: str) -> str:
        """Where a reconstruction sends the client for a xorb's bytes: signed, like a presigned URL."""
        signature = hmac.new(self.hub._xet_url_key, xorb.encode(), "sha256").hexdigest()[:32]
        return f"{self.hub.url}{CAS_PREFIX}/xorb-data/{xorb}?sig={signature}"

    def _cas(self, method: str, path: str, body: bytes) -> int:
        store = self.hub.cas
        if (xorb := re.fullmatch(r"/v1/xorbs/[^/]+/(?P<hash>[0-9a-f]{64})", path)) and method == "POST":
            self._require_xet_token("write")
            return self._ok({"was_inserted": store.add_xorb(xorb["hash"], body)})
        if path == "/v1/shards" and method == "POST":
            self._require_xet_token("write")
            try:
                rebuilt = store.add_shard(body)
            except XetFormatError as error:
                raise _HttpError(400, f"Invalid shard: {error}") from error
            for file, data in rebuilt:  # the files a commit may now name by sha256
                sha256 = hashlib.sha256(data).hexdigest()
                self.hub.lfs_objects[sha256] = data
                self.hub.xet_hashes[sha256] = file.xet_hash
            return self._ok({"result": 1})  # SyncPerformed
        if re.fullmatch(r"/v1/chunks/[^/]+/[0-9a-f]{64}", path) and method == "GET":
            self._require_xet_token("read")
            # Global deduplication is not offered: no shard is ever answered, so clients deduplicate against
            # what they uploaded themselves (their shard cache).
            raise _HttpError(404, "No deduplication information for this chunk")
        if (file := re.fullmatch(r"/v1/reconstructions/(?P<hash>[0-9a-f]{64})", path)) and method == "GET":
            self._require_xet_token("read")
            if file["hash"] not in store.files:
                raise _HttpError(404, f"File {file['hash']} is not in the CAS")
            first, end = 0, None
            if ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                first, end = int(ranged[1]), int(ranged[2]) + 1 if ranged[2] else None
            if first >= store.files[file["hash"]].size > 0:
                raise _HttpError(416, f"Range starts after the end of file {file['hash']}")
            return self._ok(store.reconstruction(file["hash"], self._xorb_url, first, end))
        if (data := re.fullmatch(r"/xorb-data/(?P<hash>[0-9a-f]{64})", path)) and method == "GET":
            expected = self._xorb_url(data["hash"]).rsplit("sig=", 1)[1]
            if not hmac.compare_digest(self.query.get("sig", [""])[0], expected):
                raise _HttpError(403, "Invalid signature for this xorb URL")
            xorb = store.xorbs.get(data["hash"])
            if xorb is None:
                raise _HttpError(404, f"Xorb {data['hash']} is not in the CAS")
            return self._send_ranged(xorb, {"Content-Type": "application/octet-stream"})
        raise _HttpError(404, f"The fake Hub's CAS does not implement {method} {path}")

    def _send_ranged(self, data: bytes, headers: dict[str, str], head: bool = False) -> int:
        """`data`, or the part a `Range: bytes=a-b` header asks for (206)."""
        status = 200
        if (ranged := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))) and not head:
            start = int(ranged[1])
            end = min(int(ranged[2]), len(data) - 1) if ranged[2] else len(data) - 1
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{len(data)}"}
            data, status = data[start : end + 1], 206
        self._send(status, data, headers, head=head)
        return status

    def _validate_yaml(self, payload: dict) -> int:
        content = payload.get("content") or ""
        match = re.match(r"^---\n(.*?)\n---\n", content, re.DOTALL)
        if match is None:
            return self._ok({"errors": [], "warnings": []})
        try:
            import yaml

            metadata = yaml.safe_load(match[1]) or {}
        except Exception as error:
            raise _HttpError(400, f"Invalid YAML metadata: {error}") from error
        errors = model_index_errors(metadata.get("model-index")) if isinstance(metadata, dict) else []
        if errors:
            self._send(400, "; ".join(errors).encode(), {"Content-Type": "text/plain"})
            return 400
        return self._ok({"errors": [], "warnings": []})

    def _collection(self, slug: str) -> dict[str, Any]:
        collection = self.hub.collections.get(slug)
        if collection is None:
            raise _HttpError(404, f"Collection {slug} not found")
        return collection

    def _add_collection_item(self, slug: str, payload: dict) -> int:
        self._require_token()
        collection = self._collection(slug)
        item = payload.get("item") or {}
        if any(i["id"] == item.get("id") and i["type"] == item.get("type") for i in collection["items"]):
            raise _HttpError(409, "Item already exists in the collection")
        collection["items"].append(
            {
                "_id": hashlib.sha1(f"{slug}/{item.get('id')}".encode()).hexdigest()[:24],
                "id": item.get("id"),
                "type": item.get("type"),
                "position": len(collection["items"]),
                **({"note": {"text": payload["note"]}} if payload.get("note") else {}),
            }
        )
        return self._ok(self._collection_json(collection))

    # --- read endpoints -----------------------------------------------------------------------------------

    def _whoami(self) -> int:
        self._require_token()
        return self._ok(
            {
                "type": "user",
                "name": self.hub.user,
                "fullname": "Fake User",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "fake", "role": "write"}},
            }
        )

    def _collection_json(self, collection: dict[str, Any]) -> dict[str, Any]:
        return {
            "slug": collection["slug"],
            "title": collection["title"],
            "owner": {"name": collection["slug"].split("/")[0], "type": "user"},
            "items": collection["items"],
            "lastUpdated": _iso(self.hub._clock),
            "position": 0,
            "private": False,
            "theme": "default",
            "upvotes": 0,
            "description": None,
        }

    def _history(self, repo: Repo, revision: str) -> list[Commit]:
        self._commit_at(repo, revision)
        return repo.history(revision)

    def _commit_json(self, commit: Commit) -> dict[str, Any]:
        return {
            "id": commit.oid,
            "title": commit.title,
            "message": commit.message,
            "date": _iso(commit.date),
            "authors": [{"user": self.hub.user}],
        }

    def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        owner = repo.repo_id.split("/")[0]
        return {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            **({"modelId": repo.repo_id} if repo.repo_type == "model" else {}),
            "author": owner,
            "sha": commit.oid,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(repo.history(commit.oid)[-1].date),
            "private": False,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [
                {"rfilename": path, "size": len(data), "blobId": git_blob_oid(data)}
                for path, data in sorted(commit.files.items())
            ],
            "usedStorage": sum(len(data) for data in commit.files.values()),
        }

    def _refs(self, repo: Repo) -> dict[str, Any]:
        return {
            "branches": [
                {"name": name, "ref": f"refs/heads/{name}", "targetCommit": oid}
                for name, oid in sorted(repo.branches.items())
            ],
            "converts": [],
            "tags": [],
            **({"pullRequests": []} if self.query.get("include_prs") else {}),
        }

    def _tree(self, repo: Repo, revision: str, prefix: str) -> int:
        commit = self._commit_at(repo, revision)
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("true", "1")
        base = prefix.strip("/") + "/" if prefix.strip("/") else ""
        files = {p: d for p, d in commit.files.items() if p.startswith(base)}
        if base and not files:
            raise _HttpError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(files.items()):
            parts = path[len(base) :].split("/")
            for depth in range(1, len(parts)):  # folders on the way
                folder = base + "/".join(parts[:depth])
                if (recursive or depth == 1) and folder not in entries:
                    oid = hashlib.sha1(f"tree:{commit.oid}:{folder}".encode()).hexdigest()
                    entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_oid(data), "size": len(data), "path": path}
                if path in commit.lfs:
                    sha = hashlib.sha256(data).hexdigest()
                    entries[path]["lfs"] = {"oid": sha, "size": len(data), "pointerSize": 134}
                    if sha in self.hub.xet_hashes:
                        entries[path]["xetHash"] = self.hub.xet_hashes[sha]
        return self._ok(list(entries.values()))

    def _resolve(self, repo: Repo, revision: str, path: str, head: bool) -> int:
        commit = self._commit_at(repo, revision)
        data = commit.files.get(path)
        if data is None:
            raise _HttpError(
                404, f"Entry not found: {path}", "EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(data)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        xet_hash = self.hub.xet_hashes.get(hashlib.sha256(data).hexdigest()) if path in commit.lfs else None
        if xet_hash is not None and self.hub.xet:
            # A file stored in Xet: clients with Xet fetch it from the CAS, with a read token from this link.
            kind = "models" if repo.repo_type == "model" else f"{repo.repo_type}s"
            refresh = f"{self.hub.url}/api/{kind}/{repo.repo_id}/xet-read-token/{commit.oid}"
            headers |= {"X-Xet-Hash": xet_hash, "Link": f'<{refresh}>; rel="xet-auth"'}
        return self._send_ranged(data, headers, head=head)


@contextlib.contextmanager
def point_hub_client_at(hub: FakeHub, cache_dir: str | os.PathLike[str]) -> Iterator[None]:
    """Make this process's huggingface_hub talk to `hub` (token, endpoint, online, cache in `cache_dir`).

    huggingface_hub copied HF_ENDPOINT, HF_HUB_OFFLINE and HF_HUB_CACHE into module constants at import, so
    the constants are patched too; HfApi objects created inside the block use the fake endpoint. hf_xet's
    session (one per process, created on first use) reads its cache folder then: a fresh one is used inside
    the block, so what it deduplicates against is what it uploaded to this hub."""
    from huggingface_hub import constants
    from huggingface_hub.utils import _xet

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_xet, "_GLOBAL_XET_HOLDER", _xet.XetSessionHolder())
        patch.setattr(constants, "ENDPOINT", hub.url)
        patch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}"
        )
        patch.setattr(constants, "HF_HUB_OFFLINE", False)
        patch.setattr(constants, "HF_HUB_DISABLE_XET", not hub.xet)
        patch.setattr(constants, "HF_XET_CACHE", str(Path(cache_dir) / "xet"))
        patch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
        for name, value in hub.client_env(cache_dir).items():
            patch.setenv(name, value)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            patch.delenv(name, raising=False)
        yield


@contextlib.contextmanager
def running_fake_hub(cache_dir: str | os.PathLike[str], xet: bool = True) -> Iterator[FakeHub]:
    """A started FakeHub with this process's huggingface_hub pointed at it; stopped on exit. With
    `xet=False`, a Hub without Xet, and clients that upload through LFS."""
    with FakeHub(xet=xet) as hub, point_hub_client_at(hub, cache_dir):
        yield hub


@pytest.fixture
def fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    """A fresh fake Hub for one test, with huggingface_hub in this process pointed at it."""
    with running_fake_hub(tmp_path / "hf-cache") as hub:
        yield hub


@pytest.fixture
def lfs_fake_hub(tmp_path: Path) -> Iterator[FakeHub]:
    """A fresh fake Hub without Xet (its clients upload through LFS), for one test."""
    with running_fake_hub(tmp_path / "hf-cache", xet=False) as hub:
        yield hub


if __name__ == "__main__":
    import tempfile

    with FakeHub(lifetime_s=3600) as served:
        cache = tempfile.mkdtemp(prefix="fake-hub-cache-")
        print("Fake Hub serving; in another shell:")
        for key, val in served.client_env(cache).items():
            print(f"export {key}={val}")
        print("unset HF_HUB_OFFLINE   # (Ctrl-C here stops the server; it stops by itself after an hour)")
        with contextlib.suppress(KeyboardInterrupt):
            while served._server is not None:
                time.sleep(0.5)
