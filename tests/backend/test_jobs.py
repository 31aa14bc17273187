"""The retrain job end to end: real Redis, real RQ workers, a fake Label Studio on loopback.

Worker processes are ``rq worker --burst -w rq.worker.SimpleWorker dpal`` subprocesses (each costs
an interpreter start and the torch import, ~9 s here), used where a process must be killed or the
test is about the worker process itself; the other runs use an RQ ``SimpleWorker`` in this process.
Training is shortened with job overrides (``FAST``); nothing reads the environment but settings.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from redis import Redis
from rq import Queue, Retry, SimpleWorker
from rq.job import Job, JobStatus
from rq.registry import StartedJobRegistry

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from fake_labelstudio import FakeLabelStudio, iso  # noqa: E402

from backend.store import ModelStore  # noqa: E402
from dpal_core.checkpoint import read_checkpoint_config  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RQ = Path(sys.executable).parent / "rq"
JOB = "backend.jobs.train_project_job"
COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}
CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Choices name="label" toName="image" choice="single">
    <Choice value="red"/><Choice value="green"/><Choice value="blue"/>
  </Choices>
</View>"""
FAST = {
    "train": {"target_steps": 20},
    "job": {"backoff_s": 0.02, "backoff_max_s": 0.1, "http_attempts": 4, "heartbeat_s": 1.0},
}


def with_job(**job: object) -> dict:
    return {"train": FAST["train"], "job": {**FAST["job"], **job}}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Noisy colour squares: 12 per colour."""
    root = tmp_path_factory.mktemp("ls-images")
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        for i in range(12):
            px = np.clip(np.array(rgb)[None, None] + rng.integers(-40, 40, (32, 32, 3)), 0, 255)
            Image.fromarray(px.astype(np.uint8)).save(root / f"{name}{i}.png")
    return root


@pytest.fixture(scope="module")
def fake_ls(images):
    with FakeLabelStudio(images) as ls:
        yield ls


@pytest.fixture()
def env(tmp_path, tiny_clip_dir, fake_ls, redis_clean, monkeypatch) -> dict[str, str]:
    """The worker environment; also set here for the jobs run by an in-process worker."""
    fake_ls.clear_faults()
    with fake_ls.lock:
        fake_ls.calls.clear()
    values = {
        "LABEL_STUDIO_URL": fake_ls.url,
        "LABEL_STUDIO_API_KEY": fake_ls.token,
        "DPAL_MODEL": str(tiny_clip_dir),
        "MODEL_DIR": str(tmp_path / "models"),
        "REDIS_URL": redis_clean,
        "DPAL_DEVICE": "cpu",
        "LOG_LEVEL": "INFO",
    }
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    return values


@dataclass
class Project:
    id: int
    pool: list[int] = field(default_factory=list)  # tasks that must get a prediction
    labelled: list[int] = field(default_factory=list)


def make_project(ls: FakeLabelStudio, unlabelled: int, extras: bool = True) -> Project:
    """4 labelled tasks per colour, ``unlabelled`` more per colour; with ``extras`` the odd cases."""
    p = Project(ls.add_project(CONFIG))
    for name in COLOURS:
        for i in range(4 + unlabelled):
            anns = [ls.choice(name)] if i < 4 else None
            tid = ls.add_task(p.id, {"image": f"/data/upload/{name}{i}.png"}, anns)
            (p.labelled if anns else p.pool).append(tid)
    if extras:
        img = {"image": "/data/upload/blue11.png"}
        p.pool.append(ls.add_task(p.id, img, [ls.choice("red", was_cancelled=True)]))  # skipped: still to do
        p.labelled.append(ls.add_task(p.id, img, [{"result": []}]))  # empty: labelled, not trained on
        p.labelled.append(ls.add_task(p.id, img, [ls.choice("purple")]))  # outside the config
        latest = [ls.choice("red", updated_at=iso(1)), ls.choice("blue", updated_at=iso(5))]
        p.labelled.append(ls.add_task(p.id, img, latest))  # the later "blue" wins
    return p


def enqueue(
    redis_url: str, project: int, job_id: str, overrides: dict = FAST, retry: Retry | None = None
) -> Job:
    queue = Queue("dpal", connection=Redis.from_url(redis_url))
    return queue.enqueue(JOB, str(project), overrides, job_id=job_id, retry=retry, job_timeout=300)


def work_here(redis_url: str, max_jobs: int | None = None) -> None:
    conn = Redis.from_url(redis_url)
    SimpleWorker([Queue("dpal", connection=conn)], connection=conn).work(burst=True, max_jobs=max_jobs)


def start_worker(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    cmd = [str(RQ), "worker", "--burst", "--url", env["REDIS_URL"], "-w", "rq.worker.SimpleWorker", "dpal"]
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            cmd, cwd=REPO, env=full_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def kill(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)


def wait_for(what: str, check: Callable[[], bool], timeout: float, log_path: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    tail = log_path.read_text()[-3000:] if log_path and log_path.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n{tail}")


def result(redis_url: str, job_id: str) -> dict:
    job = Job.fetch(job_id, connection=Redis.from_url(redis_url))
    assert job.get_status() == JobStatus.FINISHED, (
        job.latest_result().exc_string if job.latest_result() else job
    )
    return job.latest_result().return_value


def failure(redis_url: str, job_id: str) -> str:
    job = Job.fetch(job_id, connection=Redis.from_url(redis_url))
    assert job.get_status() == JobStatus.FAILED
    return job.latest_result().exc_string


def versions_of(ls: FakeLabelStudio, task_id: int) -> list[str]:
    return [p["model_version"] for p in ls.predictions(task_id)]


def assert_pushed_once(ls: FakeLabelStudio, p: Project, mv: str) -> None:
    for tid in p.pool:
        assert versions_of(ls, tid).count(mv) == 1, (tid, versions_of(ls, tid))
    for tid in p.labelled:
        assert mv not in versions_of(ls, tid)


# ---- the full path in a worker process, then a kill mid-push ------------------------------------


def test_full_job_path_in_a_worker_process_then_kill_mid_push(env, fake_ls, tmp_path):
    """One worker process runs two jobs of project A, then is SIGKILLed while pushing project B."""
    url = env["REDIS_URL"]
    redis = Redis.from_url(url)
    a = make_project(fake_ls, unlabelled=6)
    b = make_project(fake_ls, unlabelled=8, extras=False)  # 24 tasks to push, 6 chunks of 4
    fake_ls.fail("GET", r"^/api/tasks", status=503, times=2)  # fetch: retried
    fake_ls.fail("POST", r"/import/predictions$", status=502, times=1)  # push: retried
    fake_ls.fail("POST", r"/import/predictions$", lose_answer=True, times=1)  # created, answer lost
    b_push = rf"^/api/projects/{b.id}/import/predictions$"
    fake_ls.fail("POST", b_push, status=None, delay_s=0.7, times=None)  # B: a slow Label Studio
    overrides = with_job(push_chunk=5)
    enqueue(url, a.id, "first", overrides)
    enqueue(url, a.id, "again", overrides)  # the same annotations once more
    enqueue(url, b.id, "push", with_job(push_chunk=4), retry=Retry(max=1))
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, log_path)
    try:
        pushed = lambda: sum(1 for c in fake_ls.calls_to("POST", b_push) if c.status == 201)  # noqa: E731
        wait_for("two pushed chunks of project B", lambda: pushed() >= 2, 120, log_path)
    finally:
        kill(proc)

    # Project A: the full path.
    first = result(url, "first")
    assert first["status"] == "published" and first["version"] == 1
    # Cross-fitting's pool term reads only cached embeddings and fetches nothing: of the pool, only
    # blue11.png was cached, because a labelled task shows the same image.
    assert first["crossfit_pool"] == 1
    ann = first["annotations"]
    assert ann["skipped"] == {"cancelled_annotations": 1, "empty_annotations": 1, "unknown_label": 1}
    assert ann["unknown_labels"] == {"purple": 1}
    metrics = first["metrics"]
    assert metrics["per_class"] == {"red": 4, "green": 4, "blue": 5}  # the latest annotation won
    assert metrics["method"] == "5-fold" and metrics["n_eval"] == metrics["n_train"] == 13
    for key in ("accuracy", "error_auroc", "ece", "zero_shot_accuracy"):
        assert key in metrics

    store = ModelStore(env["MODEL_DIR"])
    assert store.current_version(str(a.id)) == 1 and store.versions(str(a.id)) == [1]
    stored = read_checkpoint_config(store.project_dir(str(a.id)) / "versions" / "1")["metadata"]
    assert stored["metrics"]["accuracy"] == metrics["accuracy"]

    mv = first["model_version"]
    assert first["rescore"]["pushed"] == len(a.pool) == 19
    assert first["rescore"]["found_after_failure"] == 5  # the chunk whose answer was lost
    assert_pushed_once(fake_ls, a, mv)
    assert fake_ls.project(a.id)["model_version"] == mv
    scores = [pr["score"] for t in a.pool for pr in fake_ls.predictions(t)]
    assert all(0.0 < s < 1.0 for s in scores)
    pushes = fake_ls.calls_to("POST", rf"^/api/projects/{a.id}/import/predictions$")
    assert all(len(c.body) <= 5 for c in pushes)
    assert [c.status for c in fake_ls.calls_to("GET", r"^/api/tasks")][:3] == [503, 503, 200]

    again = result(url, "again")
    assert again["status"] == "unchanged" and again["version"] == 1
    assert again["rescore"]["pushed"] == 0 and again["rescore"]["already_predicted"] == 19
    assert_pushed_once(fake_ls, a, mv)  # re-running the job created nothing twice
    text = log_path.read_text()
    assert "Authorization" not in text and fake_ls.token not in text

    # Project B: killed mid-push.
    assert store.versions(str(b.id)) == [1] and store.current_version(str(b.id)) == 1
    read_checkpoint_config(store.project_dir(str(b.id)) / "versions" / "1")  # whole
    assert fake_ls.project(b.id)["model_version"] == ""  # not switched: its predictions are partial
    counts = [len(fake_ls.predictions(t)) for t in b.pool]
    assert 0 < sum(counts) < len(b.pool) and max(counts) == 1

    fake_ls.clear_faults()
    StartedJobRegistry("dpal", connection=redis).cleanup(time.time() + 3600)  # abandoned -> retried
    assert Job.fetch("push", connection=redis).get_status() == JobStatus.QUEUED
    work_here(url)  # the same job id re-takes its own run lock
    retried = result(url, "push")
    assert retried["status"] == "unchanged" and retried["version"] == 1
    assert retried["rescore"]["already_predicted"] + retried["rescore"]["pushed"] == len(b.pool)
    assert_pushed_once(fake_ls, b, retried["model_version"])
    assert fake_ls.project(b.id)["model_version"] == retried["model_version"]
    assert store.versions(str(b.id)) == [1]


# ---- Label Studio down --------------------------------------------------------------------------


def test_persistent_5xx_fails_with_a_reason_and_publishes_nothing_half(env, fake_ls):
    url = env["REDIS_URL"]
    p = make_project(fake_ls, unlabelled=2, extras=False)
    store = ModelStore(env["MODEL_DIR"])

    fake_ls.fail("GET", r"^/api/tasks", status=503, times=None)
    enqueue(url, p.id, "down-fetch")
    work_here(url)
    reason = failure(url, "down-fetch")
    assert "LabelStudioUnavailable" in reason and "after 4 tries" in reason and "HTTP 503" in reason
    assert store.current_version(str(p.id)) == 0 and store.versions(str(p.id)) == []

    fake_ls.clear_faults()
    fake_ls.fail("POST", r"/import/predictions$", status=500, times=None)
    enqueue(url, p.id, "down-push")
    work_here(url)
    reason = failure(url, "down-push")
    assert "pushing predictions of dpal-v1-" in reason and "HTTP 500" in reason
    assert store.versions(str(p.id)) == [1]  # published whole (the server may serve it) ...
    assert fake_ls.project(p.id)["model_version"] == ""  # ... but Label Studio was not switched
    assert all(not fake_ls.predictions(t) for t in p.pool)

    fake_ls.clear_faults()
    enqueue(url, p.id, "recovered")
    work_here(url)
    done = result(url, "recovered")
    assert done["status"] == "unchanged" and done["rescore"]["pushed"] == len(p.pool)
    assert_pushed_once(fake_ls, p, done["model_version"])
    assert fake_ls.project(p.id)["model_version"] == done["model_version"]


# ---- SIGKILL ------------------------------------------------------------------------------------


def test_kill_mid_training_keeps_the_served_version_and_one_job_per_project(env, fake_ls, tmp_path):
    url = env["REDIS_URL"]
    redis = Redis.from_url(url)
    p = make_project(fake_ls, unlabelled=2, extras=False)
    enqueue(url, p.id, "v1")
    work_here(url)
    v1 = result(url, "v1")["model_version"]
    fake_ls.annotate(p.pool[0], fake_ls.choice("red"))  # new annotation: the next run must train

    slow = {"train": {"epochs": 100_000}, "job": {**FAST["job"], "min_eval_labels": 1000}}
    enqueue(url, p.id, "slow", slow)
    log_path = tmp_path / "worker.log"
    proc = start_worker(env, log_path)
    try:
        slow_job = Job.fetch("slow", connection=redis)
        wait_for("the slow job to train", lambda: slow_job.get_meta().get("stage") == "train", 60, log_path)

        enqueue(url, p.id, "second")  # meanwhile another job for the same project
        work_here(url)
        assert result(url, "second")["status"] == "skipped"
        assert redis.get(f"dpal:project:{p.id}:followup")  # one follow-up run recorded
        time.sleep(0.3)
    finally:
        kill(proc)

    store = ModelStore(env["MODEL_DIR"])
    assert store.current_version(str(p.id)) == 1 and store.versions(str(p.id)) == [1]
    vdir = store.project_dir(str(p.id)) / "versions"
    assert sorted(x.name for x in vdir.iterdir() if not x.name.startswith(".")) == ["1"]
    assert fake_ls.project(p.id)["model_version"] == v1

    # The killed worker's lock expires by its TTL (LOCK_TTL_S); here it is expired by hand.
    redis.delete(f"dpal:project:{p.id}:running")
    StartedJobRegistry("dpal", connection=redis).cleanup(time.time() + 3600)  # RQ: abandoned -> failed
    assert Job.fetch("slow", connection=redis).get_status() == JobStatus.FAILED
    enqueue(url, p.id, "rerun", with_job(warm_start=True))
    work_here(url, max_jobs=1)
    rerun = result(url, "rerun")
    assert rerun["status"] == "published" and rerun["version"] == 2
    # Version 1's re-score cached every pool image: cross-fitting's pool term now uses all of those
    # still unlabelled (p.pool[0] was annotated since).
    assert rerun["crossfit_pool"] == len(p.pool) - 1
    meta = read_checkpoint_config(store.project_dir(str(p.id)) / "versions" / "2")["metadata"]
    assert meta["warm_start_from"] == 1 and meta["job_id"] == "rerun"
    assert fake_ls.project(p.id)["model_version"] == rerun["model_version"]
    assert len(Queue("dpal", connection=redis)) == 1  # the follow-up recorded while "slow" ran


# ---- sharding, refusal, status ------------------------------------------------------------------


def test_large_pool_is_rescored_by_shard_jobs_then_switched(env, fake_ls):
    from backend.settings import Settings
    from backend.status import format_status

    url = env["REDIS_URL"]
    p = make_project(fake_ls, unlabelled=6, extras=False)  # 18 unlabelled tasks
    enqueue(url, p.id, "big", with_job(shard_size=5, push_chunk=4))
    work_here(url)  # the training job, then its 4 shard jobs, then the finalize job
    big = result(url, "big")
    assert big["status"] == "published" and big["rescore"]["shards"] == [f"big-shard-{i}" for i in range(4)]
    pushed = [result(url, s)["pushed"] for s in big["rescore"]["shards"]]
    assert pushed == [5, 5, 5, 3]
    assert result(url, "big-finalize")["switched"] is True
    assert_pushed_once(fake_ls, p, big["model_version"])
    assert fake_ls.project(p.id)["model_version"] == big["model_version"]
    redis = Redis.from_url(url)
    assert redis.get(f"dpal:project:{p.id}:running") is None  # the finalize job released the lock

    text = format_status(p.id, Settings.from_env())
    assert f"version 1 ({big['model_version']})" in text and "accuracy=" in text
    assert "running: none" in text and "queued: none" in text


def test_a_clearly_worse_version_is_refused(env, fake_ls):
    url = env["REDIS_URL"]
    p = make_project(fake_ls, unlabelled=1, extras=False)
    enqueue(url, p.id, "worse", with_job(refuse_tolerance=-1.0, refuse_min_eval=1))  # refuse anything
    work_here(url)
    refused = result(url, "worse")
    assert refused["status"] == "refused" and "below zero-shot CLIP's" in refused["reason"]
    assert ModelStore(env["MODEL_DIR"]).versions(str(p.id)) == []
    assert all(not fake_ls.predictions(t) for t in p.pool)
    assert not fake_ls.calls_to("PATCH", r"^/api/projects/") and fake_ls.project(p.id)["model_version"] == ""


def test_vpt_scores_fetched_pixels(env, fake_ls, monkeypatch):
    monkeypatch.setenv("DPAL_PARADIGM", "vpt")
    url = env["REDIS_URL"]
    p = make_project(fake_ls, unlabelled=1, extras=False)
    enqueue(url, p.id, "vpt", {**FAST, "prompt": {"n_ctx": 2, "vpt_tokens": 2}})
    work_here(url)
    done = result(url, "vpt")
    assert (
        done["status"] == "published" and done["rescore"]["fetched"] == len(p.pool) == 3
    )  # no cache for vpt
    assert_pushed_once(fake_ls, p, done["model_version"])
    info = read_checkpoint_config(ModelStore(env["MODEL_DIR"]).project_dir(str(p.id)) / "versions" / "1")
    assert info["prompt_config"]["paradigm"] == "vpt"
