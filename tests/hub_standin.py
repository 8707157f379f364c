"""A local HTTP server on 127.0.0.1 that STANDS IN FOR THE HUGGING FACE HUB in tests (the real Hub is never reachable
here).

It answers the endpoints `huggingface_hub` 2.4 calls to publish a folder: `POST /api/repos/create`,
`GET /api/models/{repo}` (repo_info, used by create_repo(exist_ok=True) after a 401/403),
`POST /api/models/{repo}/branch/{branch}`, `POST /api/validate-yaml`, `POST /api/models/{repo}/preupload/{rev}`
and `POST /api/models/{repo}/commit/{rev}` (an ndjson body), and records every uploaded file and its bytes.

Upload path: the real Hub's preupload answer puts binary files on the LFS path, which huggingface_hub 2.4 sends
through Xet storage (`hf_xet` is installed, so the library uses it for every LFS file: a CAS server and token
refresh endpoints a test cannot stand in for). The server decides the upload mode, so this stand-in answers
`uploadMode: "regular"` for every file: the files then travel base64-encoded inside the commit, through the same
`create_commit` code path. Large-file (Xet/LFS) transfer itself is therefore not exercised by these tests.

Accounts: `tokens` maps a token to a user name (and whether it may write). A user may create repositories in
their own namespace only and write only to repositories they own, as on the Hub. `fail` forces an error:
"401" (every request refused, as with an invalid token) or "403" (every write refused, as with a read-only token).
`stop()` then a request models a network that is down (connection refused).

Card metadata: `POST /api/validate-yaml` checks a README's YAML front matter as the Hub does before a commit, for the
fields a merge card uses (a mapping; `base_model` as Hub ids; `base_model_relation` one of the Hub's values;
`model-index` results with `task.type`, `dataset.type`, `dataset.name` and metrics with `type` and `value`), and
answers 400 with the errors, as the Hub does. Every content it was asked to check is kept in `validated`.
"""
from __future__ import annotations
import base64, hashlib, json, re, threading
import yaml
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class HubStandIn:
    def __init__(self, tokens: dict | None = None):
        self.tokens = dict(tokens or {})        # token -> (user, can_write)
        self.repos: dict = {}                    # repo_id -> {"owner", "private", "branches": {name: {path: bytes}}}
        self.commits: list = []                  # {"repo_id", "revision", "summary", "files": [paths], "deleted"}
        self.requests: list = []                 # (method, path, authorization header) in order
        self.fail: str | None = None
        self.validated: list = []                # README contents sent to validate-yaml
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)

    @property
    def endpoint(self) -> str: return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self):
        self._thread.start(); return self

    def stop(self):
        "Stop answering: later requests are refused, as when the network is down (safe to call twice)."
        if self._thread.is_alive(): self._server.shutdown()
        self._server.server_close()

    def __enter__(self): return self.start()
    def __exit__(self, *exc): self.stop()

    def add_repo(self, repo_id: str, owner: str, private: bool = False):
        "A repository that already exists (e.g. one owned by someone else)."
        self.repos[repo_id] = dict(owner=owner, private=private, branches={"main": {}})

    def files(self, repo_id: str, branch: str = "main") -> dict:
        "{path: bytes} of `branch` of `repo_id` as uploaded."
        return self.repos[repo_id]["branches"][branch]

    @staticmethod
    def metadata_errors(content: str) -> list:
        "The errors the Hub's validate-yaml would report for a README's front matter (the fields merge cards use)."
        m = re.match(r"^---\n(.*?)\n---\n", content, re.S)
        if not m: return []
        try: meta = yaml.safe_load(m[1])
        except yaml.YAMLError as e: return [f"invalid YAML: {e}"]
        if meta is None: return []
        if not isinstance(meta, dict): return ["metadata must be a mapping"]
        errors, repo = [], re.compile(r"^[\w.-]+/[\w.-]+$")
        base = meta.get("base_model")
        bases = [base] if isinstance(base, str) else base
        if base is not None and not all(isinstance(b, str) and repo.match(b) for b in bases):
            errors.append(f'"base_model" must be Hub model ids, got {base!r}')
        if meta.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
            errors.append(f'"base_model_relation" {meta["base_model_relation"]!r} is not allowed')
        for i, model in enumerate(meta.get("model-index") or []):
            for j, r in enumerate(model.get("results") or []):
                where = f'"model-index[{i}].results[{j}]'
                if not (r.get("task") or {}).get("type"): errors.append(f'{where}.task.type" is required')
                for key in ("type", "name"):
                    if not (r.get("dataset") or {}).get(key): errors.append(f'{where}.dataset.{key}" is required')
                metrics = r.get("metrics") or []
                if not metrics: errors.append(f'{where}.metrics" is required')
                for k, metric in enumerate(metrics):
                    for key in ("type", "value"):
                        if metric.get(key) is None: errors.append(f'{where}.metrics[{k}].{key}" is required')
        return errors

    def _handler(hub):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a): pass   # quiet: tests read captured output

            def _send(self, status: int, body: dict, error_code: str | None = None):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if error_code: self.send_header("X-Error-Code", error_code)
                if status >= 400: self.send_header("X-Error-Message", body.get("error", ""))
                self.end_headers(); self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _user(self):
                "(user, can_write) of the bearer token, or None."
                auth = self.headers.get("Authorization", "")
                tok = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
                return hub.tokens.get(tok) if tok else None

            def _guard(self, write: bool):
                "The user name, or None after answering with the error the Hub gives."
                user = self._user()
                if hub.fail == "401" or user is None:
                    self._send(401, {"error": "Invalid credentials in Authorization header"}); return None
                if write and (hub.fail == "403" or not user[1]):
                    self._send(403, {"error": "You don't have the rights to write with this token (read-only)"})
                    return None
                return user[0]

            def do_GET(self):
                hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
                m = re.fullmatch(r"/api/models/([^/]+/[^/?]+)(?:/revision/([^?]+))?(?:\?.*)?", self.path)
                if not m: return self._send(404, {"error": "not found"})
                user = self._guard(write=False)
                if user is None: return
                repo = hub.repos.get(m[1])
                if repo is None or (repo["private"] and repo["owner"] != user):
                    return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
                return self._send(200, {"id": m[1], "modelId": m[1], "sha": "0" * 40, "private": repo["private"],
                                        "siblings": [{"rfilename": p} for p in repo["branches"]["main"]]})

            def do_POST(self):
                hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
                body, path = self._body(), self.path.split("?")[0]
                if path == "/api/validate-yaml":
                    content = json.loads(body).get("content", "")
                    hub.validated.append(content)
                    errors = hub.metadata_errors(content)
                    answer = {"error": "Invalid metadata" if errors else "", "warnings": [],
                              "errors": [{"message": e} for e in errors]}
                    return self._send(400 if errors else 200, answer)
                if path == "/api/repos/create": return self._create(json.loads(body))
                m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit)/(.+)", path)
                if not m: return self._send(404, {"error": "not found"})
                user = self._guard(write=True)
                if user is None: return
                repo_id, action, rev = m[1], m[2], m[3].replace("%2F", "/")
                repo = hub.repos.get(repo_id)
                if repo is None: return self._send(404, {"error": "Repository not found"}, "RepoNotFound")
                if repo["owner"] != user:
                    return self._send(403, {"error": f"You don't have the rights to write to {repo_id}"})
                if action == "branch":
                    if rev in repo["branches"]: return self._send(409, {"error": f"Reference {rev} already exists"})
                    repo["branches"][rev] = dict(repo["branches"]["main"]); return self._send(200, {})
                if rev not in repo["branches"]:
                    return self._send(404, {"error": f"Invalid rev id: {rev}"}, "RevisionNotFound")
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(200, {"files": [dict(path=f["path"], uploadMode="regular", shouldIgnore=False,
                                                           oid=None) for f in files]})
                return self._commit(repo_id, repo["branches"][rev], rev, body)

            def _create(self, payload):
                user = self._guard(write=True)
                if user is None: return
                ns, name = payload.get("organization") or user, payload["name"]
                repo_id = f"{ns}/{name}"
                if ns != user:
                    error = f'You don\'t have the rights to create a model under the namespace "{ns}"'
                    return self._send(403, {"error": error})
                if repo_id in hub.repos:
                    return self._send(409, {"error": "You already created this model repo",
                                            "url": f"{hub.endpoint}/{repo_id}"})
                hub.add_repo(repo_id, owner=user, private=payload.get("visibility") == "private")
                return self._send(200, {"url": f"{hub.endpoint}/{repo_id}", "name": repo_id})

            def _commit(self, repo_id, branch, rev, body):
                entries = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(e["value"] for e in entries if e["key"] == "header")
                added, deleted = {}, []
                for e in entries:
                    if e["key"] == "file": added[e["value"]["path"]] = base64.b64decode(e["value"]["content"])
                    elif e["key"] in ("deletedFile", "deletedFolder"): deleted.append(e["value"]["path"])
                    elif e["key"] == "lfsFile":
                        return self._send(400, {"error": "the stand-in accepts regular uploads only"})
                branch.update(added)
                for p in deleted: branch.pop(p, None)
                oid = hashlib.sha1(body).hexdigest()
                hub.commits.append(dict(repo_id=repo_id, revision=rev, summary=header.get("summary"),
                                        files=sorted(added), deleted=deleted))
                return self._send(200, {"commitUrl": f"{hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid,
                                        "pullRequestUrl": None, "success": True})
        return Handler
