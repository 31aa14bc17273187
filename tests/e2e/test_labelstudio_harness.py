"""Smoke test of the Label Studio harness against a real Label Studio.

Installs Label Studio into its cached venv if needed (~90 s the first time),
starts it, creates a project from ``label_config/animal_mnist.xml``, imports
local PNG files, connects a stand-in ML backend on loopback, pulls its
predictions, submits an annotation and stops the server.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from labelstudio import (
    LABEL_CONFIG_DIR,
    LabelStudioServer,
    local_files_url,
    port_in_use,
)
from PIL import Image

pytestmark = pytest.mark.slow

CLASSES = ["bear", "bird", "cat"]


class _FakeBackend(BaseHTTPRequestHandler):
    """The ML-backend protocol at its smallest: every task is a 'bird', score 0.25."""

    calls: list[tuple[str, Any]] = []

    def _reply(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.calls.append(("GET", self.path))
        self._reply({"status": "UP", "model_class": "Fake"})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.calls.append(("POST", self.path))
        if self.path.startswith("/setup"):
            self._reply({"model_version": "fake-1"})
        elif self.path.startswith("/predict"):
            result = [
                {
                    "from_name": "animal",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": ["bird"]},
                }
            ]
            preds = [{"result": result, "score": 0.25, "model_version": "fake-1"} for _ in body["tasks"]]
            self._reply({"results": preds})
        else:
            self._reply({"status": "ok"})

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def fake_backend() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeBackend)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    server = LabelStudioServer(data_dir=tmp_path_factory.mktemp("labelstudio"))
    with server:
        yield server
    assert not server.running


def _pngs(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"animal_{i:03d}.png"
        Image.new("L", (28, 28), color=40 + 80 * i).save(path)
        paths.append(path)
    return paths


def test_round_trip(label_studio: LabelStudioServer, fake_backend: str) -> None:
    ls = label_studio
    with ls.api() as api:
        project = api.create_project("DPAL harness smoke", LABEL_CONFIG_DIR / "animal_mnist.xml")
        pid = project["id"]
        assert '<Choice value="zebra"/>' in api.get_project(pid)["label_config"]

        files = _pngs(ls.document_root / "animals", 3)
        task_ids = api.import_local_files(pid, files, ls.document_root)
        assert len(task_ids) == 3

        tasks = sorted(api.list_tasks(pid), key=lambda t: t["id"])
        assert [t["id"] for t in tasks] == sorted(task_ids)
        assert [t["data"]["image"] for t in tasks] == [local_files_url(f, ls.document_root) for f in files]
        # Served over HTTP with the token, byte for byte (needs the local storage).
        assert api.fetch(tasks[0]["data"]["image"]) == files[0].read_bytes()

        backend = api.connect_ml_backend(pid, fake_backend)
        assert backend["id"] in [b["id"] for b in api.ml_backends(pid)]
        assert ("POST", "/setup") in _FakeBackend.calls

        api.retrieve_predictions(pid, task_ids)
        by_task = {t["id"]: t for t in api.list_tasks(pid)}
        for tid in task_ids:
            (pred,) = by_task[tid]["predictions"]
            assert pred["result"][0]["value"]["choices"] == ["bird"]
            assert pred["score"] == pytest.approx(0.25)
            assert pred["model_version"] == "fake-1"
            assert api.predictions(tid)[0]["model_version"] == "fake-1"

        annotation = api.submit_annotation(task_ids[0], "animal", "image", "cat")
        assert annotation["result"][0]["value"]["choices"] == ["cat"]
        assert api.get_task(task_ids[0])["total_annotations"] == 1

    # The project's own SDK (what the backend uses) talks to this Label Studio.
    sdk = ls.sdk()
    assert pid in [p.id for p in sdk.projects.list()]
    assert sorted(t.id for t in sdk.tasks.list(project=pid)) == sorted(task_ids)


def test_restart_keeps_data_and_token(tmp_path: Path) -> None:
    server = LabelStudioServer(data_dir=tmp_path / "ls")
    with server as ls, ls.api() as api:
        pid = api.create_project("kept across restarts", LABEL_CONFIG_DIR / "image_classification.xml")["id"]
    assert not port_in_use(server.port)
    # Same data dir, no token given: the remembered one is reused.
    with LabelStudioServer(data_dir=tmp_path / "ls") as ls, ls.api() as api:
        assert api.get_project(pid)["title"] == "kept across restarts"


def test_every_shipped_config_is_accepted(label_studio: LabelStudioServer) -> None:
    with label_studio.api() as api:
        for path in sorted(LABEL_CONFIG_DIR.glob("*.xml")):
            project = api.create_project(f"config {path.stem}", path)
            assert project["id"] > 0
