"""A local stand-in of the Hugging Face Hub's HTTP API: enough of it for `huggingface_hub` to create a dataset repo and
a branch, commit (regular files inline, large files through the Git LFS "basic" transfer), list, and download.

It exists so that `fusion-cache push`/`pull` and ``hf://`` reads run against the real `huggingface_hub` client with no
network (tests, offline trials). What it does not speak: Xet storage (set ``HF_HUB_DISABLE_XET=1``), pull requests,
multi-part LFS uploads, pagination. Tokens: ``writer`` tokens may write, anyone may read a public repo, only a writer
reads a private one; a missing repo answers 404 ``RepoNotFound`` as the Hub does.

Run it by hand::

    python -m fusion_cache.cache.hub_standin --port 8765 --token secret   # then HF_ENDPOINT=http://127.0.0.1:8765
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from dataclasses import dataclass
from dataclasses import field
from http.server import BaseHTTPRequestHandler
from http.server import ThreadingHTTPServer
from urllib.parse import parse_qs
from urllib.parse import unquote
from urllib.parse import urlsplit

LFS_MIN_BYTES = 10 * 1024  # files from this size (and every .arrow) are LFS, as the Hub's default .gitattributes does


def git_blob_sha1(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as the oid of a regular file)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class StoredFile:
    """A file of a commit: its bytes live inline (regular) or in the LFS store under ``lfs_oid``."""

    size: int
    oid: str  # git blob id (of the LFS pointer for an LFS file)
    lfs_oid: str | None = None
    content: bytes | None = None


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit id
    commits: dict[str, dict[str, StoredFile]] = field(default_factory=dict)  # commit id -> path -> file


class StandinHub:
    """The stand-in's state and server: ``with StandinHub(tokens={"t"}) as hub: hub.url``.

    Args:
        tokens: tokens with write access (and read access to private repos).

    Attributes:
        fail: ``{(method, path prefix): n}``: answer the next n matching requests with 503 (a flaky network).
        requests: ``(method, path)`` of every request served, in order.
        bytes_sent: the bytes of every response body served.
    """

    def __init__(self, tokens: set[str] | None = None):
        self.tokens = set(tokens or ())
        self.repos: dict[str, Repo] = {}  # "datasets/org/name" -> repo
        self.lfs: dict[str, bytes] = {}
        self.fail: dict[tuple[str, str], int] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for tests to count
        self.bytes_sent = 0  # response bodies served, for measuring downloads
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> StandinHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str, contains: str) -> int:
        """How many requests of ``method`` had ``contains`` in their path."""
        return sum(1 for m, p in self.requests if m == method and contains in p)

    def head(self, repo: str, revision: str = "main") -> dict[str, StoredFile]:
        r = self.repos[repo]
        return r.commits[r.branches.get(revision, revision)]

    def file_bytes(self, f: StoredFile) -> bytes:
        return f.content if f.lfs_oid is None else self.lfs[f.lfs_oid]


def _handler(hub: StandinHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # quiet: tests read hub.requests instead
            pass

        # ------------------------------------------------------------ plumbing
        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict | None = None) -> None:
            if not isinstance(body, bytes):
                body = json.dumps(body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, str(v))
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
                hub.bytes_sent += len(body)

        def _error(self, status: int, code: str | None, message: str) -> None:
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _read_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                data = b""
                while True:
                    n = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                    chunk = self.rfile.read(n + 2)  # the chunk and its CRLF
                    if n == 0:
                        return data
                    data += chunk[:-2]
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _body(self) -> bytes:
            return self.payload

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[7:] if auth.startswith("Bearer ") else None

        def _writer(self) -> bool:
            return self._token() in hub.tokens

        def _repo(self, key: str, *, write: bool = False) -> Repo | None:
            """The repo, or None after answering the error the Hub gives (missing/private: 404, no write: 403)."""
            repo = hub.repos.get(key)
            if repo is None or (repo.private and not self._writer()):
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if write and not self._writer():
                if self._token() is None:
                    self._error(401, None, "Invalid credentials in Authorization header")
                else:
                    self._error(403, None, "You don't have the rights to create a commit in this repo")
                return None
            return repo

        def _commit_of(self, repo: Repo, revision: str) -> str | None:
            revision = unquote(revision)
            sha = repo.branches.get(revision) or (revision if revision in repo.commits else None)
            if sha is None:
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return sha

        def _dispatch(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parse_qs(parts.query)
            self.payload = self._read_body()  # always read whole: the connection is kept alive for the next request
            with hub.lock:
                hub.requests.append((self.command, path))
                for (method, prefix), n in list(hub.fail.items()):
                    if n > 0 and method == self.command and path.startswith(prefix):
                        hub.fail[(method, prefix)] = n - 1
                        self._error(503, None, "Service Unavailable (stand-in failure)")
                        return
            bits = [unquote(b) for b in path.strip("/").split("/")]
            try:
                self._route(bits, query)
            except (KeyError, ValueError, json.JSONDecodeError) as e:
                self._error(400, None, f"bad request: {type(e).__name__}: {e}")

        do_GET = do_POST = do_PUT = do_HEAD = _dispatch

        # ------------------------------------------------------------ routes
        def _route(self, bits: list[str], query: dict) -> None:
            m = self.command
            if bits[:2] == ["api", "repos"] and bits[2:] == ["create"] and m == "POST":
                return self._create_repo()
            if bits[:2] == ["api", "validate-yaml"]:
                return self._send(200, {"errors": [], "warnings": []})
            if bits[:2] == ["api", "whoami-v2"]:
                return (
                    self._send(200, {"name": "standin", "type": "user"})
                    if self._writer()
                    else self._error(401, None, "Invalid credentials in Authorization header")
                )
            if bits[0] == "api" and len(bits) >= 4 and bits[1] in ("datasets", "models"):
                key = "/".join(bits[1:4])
                action, rest = (bits[4], bits[5:]) if len(bits) > 4 else ("", [])
                return self._repo_api(key, action, rest, query)
            if bits[0] == "__lfs" and m == "PUT":
                return self._lfs_put(bits[1])
            if bits[0] == "datasets" and len(bits) >= 3 and bits[2].endswith(".git"):
                return self._lfs_batch("/".join(["datasets", bits[1], bits[2][:-4]]))
            if bits[0] == "datasets" and len(bits) >= 6 and bits[3] == "resolve":
                return self._resolve("/".join(bits[:3]), bits[4], "/".join(bits[5:]))
            self._error(404, None, f"stand-in: no route for {m} {self.path}")

        def _create_repo(self) -> None:
            payload = json.loads(self._body())
            if not self._writer():
                return self._error(401, None, "Invalid credentials in Authorization header")
            key = f"{payload.get('type', 'model')}s/{payload['organization']}/{payload['name']}"
            url = f"{hub.url}/{key}"
            if key in hub.repos:
                return self._send(409, {"error": "You already created this dataset repo", "url": url})
            empty = hashlib.sha1(key.encode()).hexdigest()
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            hub.repos[key] = Repo(private=private, branches={"main": empty}, commits={empty: {}})
            self._send(200, {"url": url})

        def _repo_api(self, key: str, action: str, rest: list[str], query: dict) -> None:
            if action == "branch":
                repo = self._repo(key, write=True)
                if repo is None:
                    return
                payload = json.loads(self._body() or b"{}")
                if rest[0] in repo.branches:
                    return self._error(409, None, "Reference already exists")
                start = self._commit_of(repo, payload.get("startingPoint") or "main")
                if start is not None:
                    repo.branches[rest[0]] = start
                    self._send(200, {})
                return
            write = action in ("preupload", "commit")
            body = self._body() if self.command == "POST" else b""
            repo = self._repo(key, write=write)
            if repo is None:
                return
            if action in ("", "revision"):
                sha = self._commit_of(repo, rest[0] if rest else "main")
                if sha is not None:
                    blobs = query.get("blobs", ["false"])[0].lower() == "true"
                    self._send(200, self._info(key, repo, sha, blobs))
                return
            sha = self._commit_of(repo, rest[0] if rest else "main")
            if sha is None:
                return
            files = repo.commits[sha]
            if action == "preupload":
                return self._preupload(files, json.loads(body))
            if action == "commit":
                return self._commit(key, repo, unquote(rest[0]), files, body)
            if action == "tree":
                prefix = "/".join(rest[1:])
                recursive = query.get("recursive", ["False"])[0].lower() == "true"
                return self._send(200, self._tree(files, prefix, recursive))
            if action == "paths-info":
                asked = parse_qs(body.decode()).get("paths", [])
                return self._send(200, [e for p in asked for e in self._entry(files, p)])
            self._error(404, None, f"stand-in: no API {action}")

        # ------------------------------------------------------------ repo API
        def _info(self, key: str, repo: Repo, sha: str, blobs: bool) -> dict:
            siblings = []
            for path, f in sorted(repo.commits[sha].items()):
                s = {"rfilename": path}
                if blobs:  # as the Hub: sizes and ids only when asked for (?blobs=true, files_metadata=True)
                    s.update(size=f.size, blobId=f.oid)
                    if f.lfs_oid:
                        s["lfs"] = {"size": f.size, "sha256": f.lfs_oid, "pointerSize": 134}
                siblings.append(s)
            return {"id": key.split("/", 1)[1], "sha": sha, "private": repo.private, "siblings": siblings,
                    "lastModified": "2026-01-01T00:00:00.000Z", "tags": []}  # fmt: skip

        @staticmethod
        def _file_entry(path: str, f: StoredFile) -> dict:
            e = {"type": "file", "path": path, "size": f.size, "oid": f.oid}
            if f.lfs_oid:
                e["lfs"] = {"oid": f.lfs_oid, "size": f.size, "pointerSize": 134}
            return e

        def _entry(self, files: dict[str, StoredFile], path: str) -> list[dict]:
            path = path.strip("/")
            if path in files:
                return [self._file_entry(path, files[path])]
            if any(p.startswith(path + "/") for p in files) or path == "":
                return [{"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest()}]
            return []

        def _tree(self, files: dict[str, StoredFile], prefix: str, recursive: bool) -> list[dict]:
            prefix = prefix.strip("/")
            base = prefix + "/" if prefix else ""
            out, dirs = [], set()
            for path, f in sorted(files.items()):
                if not path.startswith(base):
                    continue
                rest = path[len(base) :]
                if "/" in rest:
                    parts = rest.split("/")
                    for depth in range(1, len(parts) if recursive else 2):
                        dirs.add(base + "/".join(parts[:depth]))
                    if not recursive:
                        continue
                out.append(self._file_entry(path, f))
            out += [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest()} for d in sorted(dirs)]
            return out

        def _preupload(self, files: dict[str, StoredFile], payload: dict) -> None:
            answer = []
            for f in payload["files"]:
                lfs = f["path"].endswith(".arrow") or f["size"] >= LFS_MIN_BYTES
                have = files.get(f["path"])
                oid = None if have is None else (have.lfs_oid or have.oid)
                answer.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                               "oid": oid})  # fmt: skip
            self._send(200, {"files": answer})

        def _commit(self, key: str, repo: Repo, branch: str, files: dict[str, StoredFile], body: bytes) -> None:
            if branch not in repo.branches:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {branch}")
            new = dict(files)
            header = None
            for line in body.splitlines():
                item = json.loads(line)
                kind, value = item["key"], item["value"]
                if kind == "header":
                    header = value
                elif kind == "file":
                    data = base64.b64decode(value["content"])
                    new[value["path"]] = StoredFile(size=len(data), oid=git_blob_sha1(data), content=data)
                elif kind == "lfsFile":
                    oid = value["oid"]
                    if oid not in hub.lfs:
                        return self._error(400, None, f"LFS object {oid} of {value['path']} was never uploaded")
                    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {value['size']}\n"
                    new[value["path"]] = StoredFile(
                        size=value["size"], oid=git_blob_sha1(pointer.encode()), lfs_oid=oid
                    )
                elif kind in ("deletedFile", "deletedFolder"):
                    new = {p: f for p, f in new.items() if p != value["path"] and not p.startswith(value["path"] + "/")}
            if header is None:
                return self._error(400, None, "commit without a header")
            sha = hashlib.sha1(f"{repo.branches[branch]}{sorted(new)}{time.time_ns()}".encode()).hexdigest()
            repo.commits[sha] = new
            repo.branches[branch] = sha
            self._send(200, {"commitUrl": f"{hub.url}/{key}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        # ------------------------------------------------------------ LFS and downloads
        def _lfs_batch(self, key: str) -> None:
            payload = json.loads(self._body())
            if self._repo(key, write=True) is None:
                return
            objects = []
            for o in payload["objects"]:
                entry = {"oid": o["oid"], "size": o["size"]}
                if o["oid"] not in hub.lfs:  # no actions: the object is there already (what makes a rerun resume)
                    entry["actions"] = {"upload": {"href": f"{hub.url}/__lfs/{o['oid']}"}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _lfs_put(self, oid: str) -> None:
            data = self._body()
            if hashlib.sha256(data).hexdigest() != oid:
                return self._error(400, None, f"LFS object does not hash to {oid}")
            hub.lfs[oid] = data
            self._send(200, {})

        def _resolve(self, key: str, revision: str, path: str) -> None:
            repo = self._repo(key)
            if repo is None:
                return
            sha = self._commit_of(repo, revision)
            if sha is None:
                return
            f = repo.commits[sha].get(path)
            if f is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
            data = hub.file_bytes(f)
            headers = {"X-Repo-Commit": sha, "ETag": f'"{f.lfs_oid or f.oid}"', "Accept-Ranges": "bytes"}
            if f.lfs_oid:
                headers["X-Linked-Etag"] = f'"{f.lfs_oid}"'
                headers["X-Linked-Size"] = f.size
            rng = self.headers.get("Range")
            if rng and rng.startswith("bytes="):
                start_s, end_s = rng[6:].split("-")
                start = int(start_s)
                end = min(int(end_s) if end_s else len(data) - 1, len(data) - 1)
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start : end + 1], headers)
            self._send(200, data, headers)

    return Handler


def point_huggingface_hub_at(url: str, setattr) -> None:
    """Make this process's huggingface_hub talk to ``url`` (a `StandinHub`) over LFS, not Xet.

    huggingface_hub reads ``HF_ENDPOINT`` once, at import; a process started afterwards may just set the environment
    (``HF_ENDPOINT=url HF_HUB_DISABLE_XET=1``). Inside one, its constants are replaced through ``setattr`` (pytest's
    ``monkeypatch.setattr``, which puts them back), and fsspec's cached ``hf://`` filesystems are dropped.
    """
    from huggingface_hub import HfFileSystem
    from huggingface_hub import constants

    setattr(constants, "ENDPOINT", url)
    setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
    setattr(constants, "HF_HUB_DISABLE_XET", True)
    HfFileSystem.clear_instance_cache()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765, help="port to listen on (127.0.0.1)")
    parser.add_argument("--token", action="append", default=[], help="a token with write access (repeat)")
    args = parser.parse_args()
    hub = StandinHub(tokens=set(args.token))
    hub.server.server_close()
    hub.server = ThreadingHTTPServer(("127.0.0.1", args.port), _handler(hub))
    print(f"stand-in Hub at {hub.url} (HF_ENDPOINT={hub.url} HF_HUB_DISABLE_XET=1)", flush=True)
    hub.server.serve_forever()


if __name__ == "__main__":
    main()
