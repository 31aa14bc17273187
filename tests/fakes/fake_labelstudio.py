"""A fake Label Studio on loopback: the endpoints the retrain job uses, shaped like Label Studio 1.23.

Threaded stdlib HTTP server. It records every call, serves task images from a folder, and injects
faults per route: an HTTP status (e.g. 503) for the next N calls, a dropped connection, or a delay.

Endpoints (auth: ``Authorization: Token <token>``, else 401 like Label Studio):
    GET   /api/projects/{id}/                      project (label_config, model_version, ...)
    PATCH /api/projects/{id}/                      model_version, validated like Label Studio:
                                                   it must be carried by a prediction of the project
    GET   /api/tasks/?project=&page=&page_size=&fields=all&query=
                                                   DataManager page: {tasks, total, total_annotations,
                                                   total_predictions}; 404 past the last page;
                                                   query={"selectedItems": {"all": false, "included": [...]}}
    POST  /api/projects/{id}/import/predictions    list of predictions; 400 if a task is not in
                                                   the project (nothing created); 201 {"created": n}
    GET   /data/upload/<path>                      a file from ``image_dir``
"""

from __future__ import annotations

import json
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

_T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def iso(minutes: float) -> str:
    """A Label Studio timestamp ``minutes`` after a fixed origin."""
    return (_T0 + timedelta(minutes=minutes)).isoformat().replace("+00:00", "Z")


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0
    started: float = 0.0
    ended: float = 0.0


@dataclass
class Fault:
    method: str
    pattern: re.Pattern
    status: int | None = 503  # None with drop=False and delay only: answer normally after the delay
    times: int | None = 1  # None = forever
    drop: bool = False  # close the connection without an answer (nothing done)
    delay_s: float = 0.0
    lose_answer: bool = False  # do the work, then close the connection without an answer


@dataclass
class FakeState:
    projects: dict[int, dict[str, Any]] = field(default_factory=dict)
    tasks: dict[int, dict[str, Any]] = field(default_factory=dict)
    next_id: int = 1


class FakeLabelStudio:
    """Start with ``with FakeLabelStudio(image_dir) as ls:``; ``ls.url`` is the base URL."""

    def __init__(self, image_dir: Path | None = None, token: str = "fake-token-0123456789abcdef") -> None:
        self.image_dir = Path(image_dir) if image_dir else None
        self.token = token
        self.state = FakeState()
        self.calls: list[Call] = []
        self.faults: list[Fault] = []
        self.lock = threading.RLock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> FakeLabelStudio:
        fake = self

        class Handler(_Handler):
            ls = fake

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-ls", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeLabelStudio:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    # ---- data -------------------------------------------------------------------------------

    def _new_id(self) -> int:
        with self.lock:
            self.state.next_id += 1
            return self.state.next_id - 1

    def add_project(self, label_config: str, title: str = "fake") -> int:
        pid = self._new_id()
        with self.lock:
            self.state.projects[pid] = {
                "id": pid,
                "title": title,
                "label_config": label_config,
                "model_version": "",
            }
        return pid

    def add_task(self, project: int, data: dict[str, Any], annotations: list[dict] | None = None) -> int:
        tid = self._new_id()
        anns = []
        for a in annotations or []:
            anns.append(
                {
                    "id": self._new_id(),
                    "task": tid,
                    "project": project,
                    "completed_by": 1,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "lead_time": 1.0,
                    "created_at": iso(0),
                    "updated_at": iso(0),
                    **a,
                }
            )
        with self.lock:
            self.state.tasks[tid] = {
                "id": tid,
                "project": project,
                "data": data,
                "annotations": anns,
                "predictions": [],
                "meta": {},
                "created_at": iso(0),
                "updated_at": iso(0),
            }
        return tid

    def annotate(self, task_id: int, annotation: dict[str, Any]) -> None:
        """Add an annotation to an existing task (as a submit in the labeling UI)."""
        with self.lock:
            task = self.state.tasks[task_id]
            task["annotations"].append(
                {
                    "id": self._new_id(),
                    "task": task_id,
                    "project": task["project"],
                    "completed_by": 1,
                    "was_cancelled": False,
                    "ground_truth": False,
                    "created_at": iso(0),
                    "updated_at": iso(0),
                    **annotation,
                }
            )

    @staticmethod
    def choice(label: str, from_name: str = "label", to_name: str = "image", **fields: Any) -> dict[str, Any]:
        """An annotation giving ``label``; extra fields (was_cancelled, updated_at, ...) as given."""
        result = [
            {"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [label]}}
        ]
        return {"result": result, **fields}

    def project(self, pid: int) -> dict[str, Any]:
        with self.lock:
            return dict(self.state.projects[pid])

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.state.tasks[task_id]["predictions"])

    def tasks_of(self, pid: int) -> list[dict[str, Any]]:
        with self.lock:
            return [t for t in self.state.tasks.values() if t["project"] == pid]

    # ---- faults and records -----------------------------------------------------------------

    def fail(
        self,
        method: str,
        path_regex: str,
        status: int | None = 503,
        times: int | None = 1,
        drop: bool = False,
        delay_s: float = 0.0,
        lose_answer: bool = False,
    ) -> None:
        """Make the next ``times`` calls (None: all) matching ``method`` and ``path_regex`` fail.

        ``status`` answers that HTTP status instead; ``drop`` closes the connection unanswered;
        ``lose_answer`` handles the call, then closes the connection unanswered; ``delay_s`` waits
        first (with ``status=None`` the call is then answered normally: a slow Label Studio).
        """
        with self.lock:
            self.faults.append(
                Fault(method.upper(), re.compile(path_regex), status, times, drop, delay_s, lose_answer)
            )

    def clear_faults(self) -> None:
        with self.lock:
            self.faults.clear()

    def calls_to(self, method: str, path_regex: str) -> list[Call]:
        rx = re.compile(path_regex)
        with self.lock:
            return [c for c in self.calls if c.method == method.upper() and rx.search(c.path)]

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for f in self.faults:
                if f.method == method and f.pattern.search(path) and (f.times is None or f.times > 0):
                    if f.times is not None:
                        f.times -= 1
                    return f
        return None


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients killed mid-call (the tests' SIGKILL) leave broken pipes; they are expected


def _task_view(task: dict[str, Any], all_fields: bool) -> dict[str, Any]:
    out = {k: v for k, v in task.items() if k not in ("annotations", "predictions")}
    done = [a for a in task["annotations"] if not a.get("was_cancelled")]
    out.update(
        total_annotations=len(done),
        cancelled_annotations=len(task["annotations"]) - len(done),
        total_predictions=len(task["predictions"]),
        is_labeled=bool(done),
        inner_id=task["id"],
        drafts=[],
        annotators=[],
    )
    if all_fields:
        out["annotations"] = [dict(a) for a in task["annotations"]]
        out["predictions"] = [dict(p) for p in task["predictions"]]
    return out


class _Handler(BaseHTTPRequestHandler):
    ls: FakeLabelStudio
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    _suppress = False

    def _reply(self, status: int, body: Any = None, content_type: str = "application/json") -> None:
        if self._suppress:  # the answer is "lost": the work is done, the client hears nothing
            self._call.status = -status
            self.close_connection = True
            return
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self._call.status = status

    def _handle(self, method: str) -> None:
        self._suppress = False
        parts = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        self._call = Call(method, parts.path, query, body, started=time.monotonic())
        with self.ls.lock:
            self.ls.calls.append(self._call)
        try:
            fault = self.ls._take_fault(method, parts.path)
            if fault is not None:
                if fault.delay_s:
                    time.sleep(fault.delay_s)
                if fault.drop:
                    self.close_connection = True
                    self._call.status = -1
                    return
                if fault.lose_answer:
                    self._suppress = True
                elif fault.status is not None:
                    self._reply(fault.status, b"<html>Service Unavailable</html>", "text/html")
                    return
            self._route(method, parts.path, query, body)
        finally:
            self._call.ended = time.monotonic()

    def do_GET(self) -> None:  # noqa: N802
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")

    def do_PATCH(self) -> None:  # noqa: N802
        self._handle("PATCH")

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Token {self.ls.token}"

    def _route(self, method: str, path: str, query: dict[str, str], body: Any) -> None:
        if not self._authorized():
            self._reply(401, {"detail": "Authentication credentials were not provided."})
            return
        if method == "GET" and path.startswith("/data/upload/"):
            return self._image(path[len("/data/upload/") :])
        m = re.fullmatch(r"/api/projects/(\d+)/?", path)
        if m and method == "GET":
            return self._get_project(int(m.group(1)))
        if m and method == "PATCH":
            return self._patch_project(int(m.group(1)), body or {})
        if method == "GET" and re.fullmatch(r"/api/tasks/?", path):
            return self._list_tasks(query)
        m = re.fullmatch(r"/api/projects/(\d+)/import/predictions/?", path)
        if m and method == "POST":
            return self._import_predictions(int(m.group(1)), body)
        self._reply(404, {"detail": "Not found."})

    def _image(self, rel: str) -> None:
        root = self.ls.image_dir
        path = (root / unquote(rel)).resolve() if root else None
        if path is None or not path.is_file() or root.resolve() not in path.parents:
            return self._reply(404, {"detail": "Not found."})
        self._reply(200, path.read_bytes(), "image/png")

    def _get_project(self, pid: int) -> None:
        with self.ls.lock:
            p = self.ls.state.projects.get(pid)
            if p is None:
                return self._reply(404, {"detail": "Not found."})
            return self._reply(200, {**p, "task_number": len(self.ls.tasks_of(pid))})

    def _patch_project(self, pid: int, body: dict[str, Any]) -> None:
        with self.ls.lock:
            p = self.ls.state.projects.get(pid)
            if p is None:
                return self._reply(404, {"detail": "Not found."})
            mv = body.get("model_version")
            if mv is not None and mv != "" and mv != p["model_version"]:
                carried = any(
                    pr["model_version"] == mv for t in self.ls.tasks_of(pid) for pr in t["predictions"]
                )
                if not carried:
                    msg = "Model version doesn't exist either as live model or as static predictions."
                    return self._reply(400, {"validation_errors": {"model_version": [msg]}})
            p.update({k: v for k, v in body.items() if k in ("model_version", "title")})
            return self._reply(200, dict(p))

    def _list_tasks(self, query: dict[str, str]) -> None:
        pid = int(query.get("project") or 0)
        page = int(query.get("page") or 1)
        size = int(query.get("page_size") or 100)
        with self.ls.lock:
            if pid not in self.ls.state.projects:
                return self._reply(404, {"detail": "Not found."})
            tasks = sorted(self.ls.tasks_of(pid), key=lambda t: t["id"])
            if query.get("query"):
                selected = json.loads(query["query"]).get("selectedItems") or {"all": True, "excluded": []}
                if selected.get("all"):
                    excluded = set(selected.get("excluded") or [])
                    tasks = [t for t in tasks if t["id"] not in excluded]
                else:
                    included = set(selected.get("included") or [])
                    tasks = [t for t in tasks if t["id"] in included]
            total = len(tasks)
            pages = max(1, -(-total // size))
            if page < 1 or page > pages:
                return self._reply(404, {"detail": "Invalid page."})
            chunk = tasks[(page - 1) * size : page * size]
            all_fields = query.get("fields") == "all"
            out = {
                "tasks": [_task_view(t, all_fields) for t in chunk],
                "total": total,
                "total_annotations": sum(len(t["annotations"]) for t in tasks),
                "total_predictions": sum(len(t["predictions"]) for t in tasks),
            }
        self._reply(200, out)

    def _import_predictions(self, pid: int, body: Any) -> None:
        with self.ls.lock:
            if pid not in self.ls.state.projects:
                return self._reply(404, {"detail": "Not found."})
            if not isinstance(body, list):
                return self._reply(400, {"detail": "expected a list of predictions"})
            for item in body:
                task = self.ls.state.tasks.get(item.get("task"))
                if task is None or task["project"] != pid:
                    return self._reply(400, [f'{item} contains invalid "task" field'])
            for item in body:
                self.ls.state.tasks[item["task"]]["predictions"].append(
                    {
                        "id": self.ls._new_id(),
                        "task": item["task"],
                        "project": pid,
                        "result": item.get("result"),
                        "score": item.get("score"),
                        "model_version": item.get("model_version", "undefined"),
                        "created_at": iso(0),
                    }
                )
        self._reply(201, {"created": len(body)})
