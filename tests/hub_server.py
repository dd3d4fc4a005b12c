"""A minimal in-memory Hugging Face Hub for tests: the endpoints `create_repo`, `upload_folder` and
`snapshot_download` use, served on 127.0.0.1 so that the real `huggingface_hub` client runs with no internet.

Uploads take the "regular" path: the preupload answer marks every file `uploadMode: "regular"`, so the client sends
the file contents base64-encoded inside the commit's NDJSON body and neither LFS nor Xet storage is involved.
Each commit gets a fresh 40-hex id; `main` (and any other branch) points at the latest commit of that branch.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubState:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo_id -> {"branches": {name: sha}, "commits": {sha: {path: bytes}}}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def files_at(self, repo_id: str, revision: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            return None
        sha = repo["branches"].get(revision, revision)
        files = repo["commits"].get(sha)
        return None if files is None else (sha, files)


def _handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        # ------------------------------------------------------------------ helpers
        def _send(self, code: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, obj, code=200, headers=None):
            self._send(code, json.dumps(obj).encode(), headers)

        def _not_found(self, what: str):
            self._send(404, json.dumps({"error": what}).encode(), {"X-Error-Code": "RepoNotFound"})

        def _body(self) -> bytes:
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else b""

        # ------------------------------------------------------------------ routes
        def do_POST(self):
            path = unquote(urlparse(self.path).path)
            state.requests.append(("POST", path))
            body = self._body()
            if path == "/api/repos/create":
                payload = json.loads(body or b"{}")
                repo_id = (
                    f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                )
                with state.lock:
                    if repo_id in state.repos:
                        return self._json(
                            {"error": "You already created this model repo", "url": self._url(repo_id)}, 409
                        )
                    state.repos[repo_id] = {"branches": {"main": "0" * 40}, "commits": {"0" * 40: {}}}
                return self._json({"url": self._url(repo_id), "name": repo_id, "id": repo_id})
            if path == "/api/validate-yaml":  # the client checks README metadata before uploading
                return self._json({"errors": [], "warnings": []})
            m = re.fullmatch(r"/api/models/(.+?)/preupload/(.+)", path)
            if m:
                files = json.loads(body)["files"]
                return self._json(
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
                )
            m = re.fullmatch(r"/api/models/(.+?)/commit/(.+)", path)
            if m:
                return self._commit(m.group(1), m.group(2), body)
            state.unhandled.append(("POST", path))
            self._not_found(f"POST {path}")

        def _url(self, repo_id: str) -> str:
            return f"http://{self.headers['Host']}/{repo_id}"

        def _commit(self, repo_id: str, revision: str, body: bytes):
            with state.lock:
                current = state.files_at(repo_id, revision)
                if current is None:
                    return self._not_found(f"{repo_id}@{revision}")
                files = dict(current[1])
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    value = item["value"]
                    if item["key"] == "file":
                        content = value["content"]
                        files[value["path"]] = (
                            base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                        )
                    elif item["key"] == "deletedFile":
                        files.pop(value["path"], None)
                    elif item["key"] == "lfsFile":
                        return self._json({"error": "this test server takes regular uploads only"}, 400)
                sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode()
                                   + str(len(state.repos[repo_id]["commits"])).encode()).hexdigest()
                state.repos[repo_id]["commits"][sha] = files
                state.repos[repo_id]["branches"][revision] = sha
            self._json({"commitUrl": f"{self._url(repo_id)}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

        def do_HEAD(self):
            self._get(head=True)

        def do_GET(self):
            self._get(head=False)

        def _get(self, head: bool):
            path = unquote(urlparse(self.path).path)
            state.requests.append((self.command, path))
            if path == "/api/agent-harnesses":  # huggingface_hub 2.x asks once for its user-agent details
                return self._json({"standardEnvVars": [], "harnesses": {}})
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path)
            if m and not head:  # snapshot_download lists the files of the resolved commit
                found = state.files_at(m.group(1), m.group(2))
                if found is None:
                    return self._not_found(f"{m.group(1)}@{m.group(2)}")
                return self._json([
                    {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in sorted(found[1].items())
                ])
            m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/(.+))?", path)
            if m and not head:
                repo_id, revision = m.group(1), m.group(2) or "main"
                found = state.files_at(repo_id, revision)
                if found is None:
                    return self._not_found(f"{repo_id}@{revision}")
                sha, files = found
                return self._json({
                    "id": repo_id, "modelId": repo_id, "sha": sha, "private": False, "disabled": False,
                    "gated": False, "downloads": 0, "likes": 0, "tags": [],
                    "siblings": [{"rfilename": name, "size": len(data)} for name, data in sorted(files.items())],
                })
            m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
            if m:
                repo_id, revision, filename = m.groups()
                found = state.files_at(repo_id, revision)
                if found is None:
                    return self._not_found(f"{repo_id}@{revision}")
                sha, files = found
                if filename not in files:
                    return self._send(404, b"{}", {"X-Error-Code": "EntryNotFound"})
                data = files[filename]
                etag = '"' + hashlib.sha1(data).hexdigest() + '"'
                return self._send(200, data, {"X-Repo-Commit": sha, "ETag": etag}, "application/octet-stream")
            state.unhandled.append((self.command, path))
            self._not_found(f"{self.command} {path}")

    return Handler


class LocalHub:
    """`with LocalHub() as hub:` serves on `hub.endpoint` (http://127.0.0.1:PORT) from a background thread."""

    def __init__(self):
        self.state = HubState()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
