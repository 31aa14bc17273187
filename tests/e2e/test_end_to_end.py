"""The whole stack end to end: a real Label Studio, Redis, ``dpal serve`` and ``dpal worker``.

Nothing is faked. Label Studio 1.23.2 runs from its cached venv (the harness in ``labelstudio.py``),
the backend and the worker are subprocesses of the project's own CLI, Redis is the session's
``redis-server``. The backbone is a tiny random CLIP (``dpal_core.tiny``), so the figures mean
nothing, but every path is the real one: Label Studio asks ``/predict``, serves the images over
HTTP with the API token, sends annotation webhooks, and the worker trains, publishes, re-scores the
pool, pushes predictions and switches the project's ``model_version``.

Steps checked:

1. 30 animal-mnist PNGs + one task whose file does not exist, imported through local storage;
   the backend connected; the Data Manager action "Retrieve predictions" fills every task: 30
   predictions with a label and a score, one empty prediction (no score) for the missing image.
2. Ordering by ``tasks:predictions_score`` ascending (what "sort by Prediction score" sends) gives
   the least confident task first, and the missing image last.
3. ``THRESHOLD`` annotations through the API, on the tasks that order shows first: exactly one
   retrain job is created; the worker runs it; version 1 is published; the project's
   ``model_version`` is switched to it; every unlabelled task with an image carries a prediction
   of version 1; the queue order is no longer version 0's. One more annotation is only counted.

Everything started is stopped by process group, also on failure; a failure prints the tails of
the backend, worker and Label Studio logs. About 1-2 minutes here once Label Studio is installed.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from labelstudio import (
    LABEL_CONFIG_DIR,
    REPO_ROOT,
    LabelStudioAPI,
    LabelStudioServer,
    free_port,
    local_files_url,
)
from processes import Service, spawn

pytestmark = pytest.mark.slow

THRESHOLD = 5  # DPAL_TRAIN_THRESHOLD for this test
PER_CLASS = 3  # animal-mnist images per class: 30 tasks
FROM_NAME, TO_NAME = "animal", "image"  # label_config/animal_mnist.xml
ORDER_BY_SCORE = json.dumps({"ordering": ["tasks:predictions_score"]})


# --------------------------------------------------------------------------- processes


def log_tail(service: Service, lines: int = 60) -> str:
    tail = service.tail(lines) or ["(no log)"]
    return f"--- last {len(tail)} lines of the {service.name} log {service.log_path}\n" + "\n".join(tail)


def start_service(name: str, args: list[str], env: dict[str, str], log_dir: Path) -> Service:
    """Start ``python -m backend.cli ARGS`` (the ``dpal`` command) in a new session."""
    return spawn(name, [sys.executable, "-m", "backend.cli", *args], env, log_dir, REPO_ROOT)


def wait_for(
    what: str, check: Callable[[], Any], timeout: float, services: list[Service], every: float = 0.5
) -> Any:
    """Poll ``check`` until it returns something truthy; fail early when a service died."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        for s in services:
            if not s.alive():
                raise AssertionError(f"{s.name} exited with {s.proc.returncode} while waiting for {what}")
        try:
            last = check()
        except (httpx.TransportError, ConnectionError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


# --------------------------------------------------------------------------- data


def write_animal_pngs(folder: Path, per_class: int, seed: int = 0) -> dict[Path, str]:
    """``per_class`` animal-mnist images of every class as PNG files; returns path -> true label."""
    from dpal_core.bench.data import load_animal_mnist

    data = load_animal_mnist()
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[Path, str] = {}
    for c, name in enumerate(data.class_names):
        for i in rng.choice(np.flatnonzero(data.labels == c), per_class, replace=False):
            path = folder / f"animal_{int(i):05d}.png"
            data.pil(int(i)).convert("L").save(path)
            out[path] = name
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------- Label Studio views


def ordered_by_score(api: LabelStudioAPI, project_id: int) -> list[dict[str, Any]]:
    """The project's tasks as the Data Manager lists them sorted by Prediction score ascending."""
    body = api.request(
        "GET",
        "/api/tasks",
        params={"project": project_id, "fields": "all", "page_size": 1000, "query": ORDER_BY_SCORE},
    )
    return body["tasks"]


def prediction(task: dict[str, Any], version: str) -> dict[str, Any]:
    """The task's one prediction of ``version`` (the task list shows every version's)."""
    preds = [p for p in task.get("predictions") or [] if p["model_version"] == version]
    assert len(preds) == 1, (
        f"task {task['id']}: expected one prediction of {version}, got {task.get('predictions')}"
    )
    return preds[0]


def rq_job_ids(redis_url: str) -> dict[str, list[str]]:
    """Every job of the ``dpal`` queue, by state."""
    from redis import Redis
    from rq import Queue

    from backend.queue import QUEUE_NAME

    q = Queue(QUEUE_NAME, connection=Redis.from_url(redis_url))
    return {
        "queued": list(q.job_ids),
        "started": list(q.started_job_registry.get_job_ids()),
        "deferred": list(q.deferred_job_registry.get_job_ids()),
        "scheduled": list(q.scheduled_job_registry.get_job_ids()),
        "finished": list(q.finished_job_registry.get_job_ids()),
        "failed": list(q.failed_job_registry.get_job_ids()),
    }


# --------------------------------------------------------------------------- the stack


@dataclass
class Stack:
    ls: LabelStudioServer
    backend_url: str
    backend: Service
    worker: Service
    redis_url: str
    model_dir: Path

    @property
    def services(self) -> list[Service]:
        return [self.backend, self.worker]

    def logs(self) -> str:
        return "\n".join([log_tail(self.backend), log_tail(self.worker), self.ls.log_tail()])


@pytest.fixture()
def stack(tmp_path: Path, redis_clean: str, tiny_clip_dir: Path) -> Iterator[Stack]:
    started = time.monotonic()
    with contextlib.ExitStack() as stop:
        ls = LabelStudioServer(data_dir=tmp_path / "labelstudio")
        ls.start()
        stop.callback(ls.stop)
        port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("LABEL_STUDIO_", "DPAL_", "BASIC_AUTH_"))
            and k not in ("REDIS_URL", "MODEL_DIR", "LOCAL_FILES_DOCUMENT_ROOT")
        }
        env.update(
            {
                "DPAL_MODEL": str(tiny_clip_dir),
                "DPAL_DEVICE": "cpu",
                "MODEL_DIR": str(tmp_path / "models"),
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.token,
                "REDIS_URL": redis_clean,
                "DPAL_TRAIN_THRESHOLD": str(THRESHOLD),
                "LOG_LEVEL": "INFO",
                # Images go through Label Studio over HTTP with the token (no LOCAL_FILES_DOCUMENT_ROOT),
                # the path a backend on another machine takes.
                "OMP_NUM_THREADS": "1",
                "MKL_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        backend = start_service(
            "backend", ["serve", "--host", "127.0.0.1", "--port", str(port)], env, tmp_path
        )
        stop.callback(backend.stop)
        worker = start_service("worker", ["worker"], env, tmp_path)
        stop.callback(worker.stop)
        s = Stack(ls, f"http://127.0.0.1:{port}", backend, worker, redis_clean, tmp_path / "models")
        try:
            with httpx.Client(base_url=s.backend_url, timeout=5) as http:
                health = wait_for(
                    "the backend's backbone",
                    lambda: (h := http.get("/health").json()).get("backbone") in ("ready", "failed") and h,
                    120,
                    [backend],
                )
                assert health["backbone"] == "ready", health

            def worker_registered() -> bool:
                from redis import Redis
                from rq import Worker

                return bool(Worker.all(connection=Redis.from_url(redis_clean)))

            wait_for("the worker to register with Redis", worker_registered, 120, [worker])
            print(f"stack up in {time.monotonic() - started:.1f} s (Label Studio {ls.startup_seconds:.1f} s)")
            yield s
        except BaseException:
            print(s.logs())
            raise
    print(f"stack stopped; {time.monotonic() - started:.1f} s in all")
    assert not ls.running and not backend.alive() and not worker.alive()


# --------------------------------------------------------------------------- the test


def test_label_studio_backend_worker_round_trip(stack: Stack) -> None:
    try:
        _round_trip(stack)
    except BaseException:
        print(stack.logs())
        raise


def _round_trip(s: Stack) -> None:
    ls = s.ls
    t0 = time.monotonic()
    truth = write_animal_pngs(ls.document_root / "animals", PER_CLASS)
    missing = ls.document_root / "animals" / "missing_animal.png"  # inside the storage, never written
    assert not missing.exists()

    with ls.api(timeout=120) as api, httpx.Client(base_url=s.backend_url, timeout=30) as backend:
        project = api.create_project("DPAL end to end", LABEL_CONFIG_DIR / "animal_mnist.xml")
        pid = project["id"]
        ids = api.import_local_files(pid, list(truth), ls.document_root)
        (missing_id,) = api.import_tasks(
            pid, [{"data": {"image": local_files_url(missing, ls.document_root)}}]
        )
        label_of = {tid: truth[path] for tid, path in zip(ids, truth, strict=True)}

        # -- connect: Label Studio calls /health and /setup, and registers <url>/webhook
        ml = api.connect_ml_backend(pid, s.backend_url, title="DPAL (e2e)")
        assert ml["readable_state"] == "Connected", ml
        v0 = backend.get(f"/versions/{pid}").json()
        assert v0["current"] == 0 and v0["versions"] == [], v0
        assert v0["training"]["backend"] == "redis", v0
        hooks = api.request("GET", "/api/webhooks", params={"project": pid})
        assert any(h["url"].rstrip("/") == f"{s.backend_url}/webhook" for h in hooks), hooks

        # -- 1. predictions for every task ("Retrieve predictions" in the Data Manager)
        t = time.monotonic()
        api.retrieve_predictions(pid, [*ids, missing_id])
        print(f"retrieve predictions for {len(ids) + 1} tasks: {time.monotonic() - t:.1f} s")
        tasks = {task["id"]: task for task in api.list_tasks(pid)}
        (version0,) = {p["model_version"] for task in tasks.values() for p in task["predictions"]}
        assert version0.startswith("dpal-v0-"), version0
        for tid in ids:
            pred = prediction(tasks[tid], version0)
            assert 0.0 <= pred["score"] <= 1.0, pred
            (item,) = pred["result"]
            assert item["from_name"] == FROM_NAME and item["to_name"] == TO_NAME, item
            assert item["value"]["choices"][0] in set(truth.values()), item
        empty = prediction(tasks[missing_id], version0)
        assert empty["result"] == [] and empty["score"] is None, empty
        assert empty["model_version"] == version0
        # Label Studio 1.23 selects the backend's *title* as the project's model_version on connect
        # (a "live model"); the Prediction score column and ordering then match no prediction until
        # the version is selected (Settings -> Model -> Predictions), as a person would do here.
        selected = api.get_project(pid)["model_version"]
        if selected != version0:
            print(f"project model_version is {selected!r} after connect; selecting {version0}")
            api.update_project(pid, model_version=version0)

        # -- 2. sorted by Prediction score ascending: least confident first, no score last
        order0 = ordered_by_score(api, pid)
        assert [task["id"] for task in order0][-1] == missing_id
        scores0 = [prediction(task, version0)["score"] for task in order0[:-1]]
        assert scores0 == sorted(scores0), scores0
        assert order0[0]["id"] == min(ids, key=lambda i: prediction(tasks[i], version0)["score"])
        if "predictions_score" in order0[0]:  # the Data Manager column itself
            assert order0[0]["predictions_score"] == pytest.approx(scores0[0])

        # -- 3. annotate up to the threshold, as "Label Tasks As Displayed" would
        to_label = [task["id"] for task in order0[:THRESHOLD]]
        for n, tid in enumerate(to_label, 1):
            api.submit_annotation(tid, FROM_NAME, TO_NAME, label_of[tid])
            if n == THRESHOLD - 1:  # one short of the threshold: counted, nothing enqueued
                st = backend.get(f"/versions/{pid}").json()["training"]
                assert st["pending"] == THRESHOLD - 1 and st["queued"] is None and st["running"] is None, st
                assert sum(map(len, rq_job_ids(s.redis_url).values())) == 0
        t = time.monotonic()

        def job_done() -> dict[str, list[str]] | None:
            jobs = rq_job_ids(s.redis_url)
            busy = jobs["queued"] or jobs["started"] or jobs["deferred"] or jobs["scheduled"]
            return None if busy or not (jobs["finished"] or jobs["failed"]) else jobs

        jobs = wait_for("the retrain job", job_done, 240, s.services)
        print(f"retrain job (queue wait + train + re-score + push): {time.monotonic() - t:.1f} s")
        assert jobs["failed"] == [], f"the retrain job failed: {jobs}"
        assert len(jobs["finished"]) == 1, f"expected exactly one retrain job, got {jobs}"
        from redis import Redis
        from rq.job import Job

        result = Job.fetch(jobs["finished"][0], connection=Redis.from_url(s.redis_url)).return_value()
        print("job result:", json.dumps(result, default=str)[:1500])
        assert result["status"] == "published" and result["version"] == 1, result

        status = backend.get(f"/versions/{pid}").json()
        assert status["current"] == 1, status
        (v1,) = [v for v in status["versions"] if v["version"] == 1]
        version1 = v1["model_version"]
        assert version1 == "dpal-v1-" + version0[len("dpal-v0-") :], (version0, version1)
        assert v1["metrics"]["n_train"] == THRESHOLD, v1
        st = status["training"]
        assert st["queued"] is None and st["running"] is None and st["pending"] == 0, st

        # the project now selects the new version
        assert api.get_project(pid)["model_version"] == version1

        # every unlabelled task with an image carries a prediction of version 1
        unlabelled = [tid for tid in ids if tid not in to_label]
        after = {task["id"]: task for task in api.list_tasks(pid)}
        for tid in unlabelled:
            pred = prediction(after[tid], version1)
            assert 0.0 <= pred["score"] <= 1.0 and pred["result"][0]["value"]["choices"], pred
        all_preds = api.request("GET", "/api/predictions", params={"project": pid})
        v1_tasks = sorted(p["task"] for p in all_preds if p["model_version"] == version1)
        assert v1_tasks == sorted(unlabelled), "version 1 predictions: one per unlabelled task with an image"

        # -- the queue follows the new model
        order1 = ordered_by_score(api, pid)
        pool0 = [task["id"] for task in order0 if task["id"] in unlabelled]
        pool1 = [task["id"] for task in order1 if task["id"] in unlabelled]
        scores1 = [prediction(after[tid], version1)["score"] for tid in pool1]
        assert scores1 == sorted(scores1), scores1
        assert sorted(pool0) == sorted(pool1)
        assert pool1 != pool0, "the queue order did not change after the retrain"
        assert order1[0]["id"] in pool1 and order1[0]["id"] == pool1[0], "an unlabelled task heads the queue"
        if "predictions_score" in order1[0]:  # the column shows version 1's score
            assert order1[0]["predictions_score"] == pytest.approx(scores1[0])
        print(f"queue head before {pool0[:5]}, after {pool1[:5]}")

        # -- one more annotation is counted and queues nothing
        api.submit_annotation(pool1[0], FROM_NAME, TO_NAME, label_of[pool1[0]])
        st = backend.get(f"/versions/{pid}").json()["training"]
        assert st["pending"] == 1 and st["queued"] is None and st["running"] is None, st
        assert rq_job_ids(s.redis_url) == {**jobs}, "an annotation below the threshold queued a job"
        print(f"whole test body {time.monotonic() - t0:.1f} s")

    # -- no error was swallowed into a log on the way
    for service in s.services:
        text = service.log_path.read_text(errors="replace")
        for marker in ("Traceback", "--- Logging error ---"):
            assert marker not in text, f"{marker!r} in the {service.name} log\n{log_tail(service, 80)}"
