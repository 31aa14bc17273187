"""The per-project state machine, against a real Redis and in memory: same rules for both."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from backend.queue import MemoryCoordinator, Outcome, RedisCoordinator


class Recorder:
    """Stands in for the job body of the embedded queue: records and waits to be released."""

    def __init__(self) -> None:
        self.started: list[tuple[str, str]] = []
        self.release = threading.Event()

    def __call__(self, project: str, job_id: str) -> None:
        self.started.append((project, job_id))
        self.release.wait(10)


@pytest.fixture(params=["redis", "memory"])
def coord(request, redis_clean):
    if request.param == "redis":
        c = RedisCoordinator(redis_clean, threshold=3)
        c.queued_jobs = lambda: c.queue.job_ids
        yield c
    else:
        rec = Recorder()
        rec.release.set()  # jobs finish at once unless a test holds them
        c = MemoryCoordinator(3, lambda project, job_id: None)
        # Inspect the embedded queue without running it: stop the worker thread first.
        c.close()
        c._thread.join(5)
        c.queued_jobs = lambda: [item[1] for item in list(c._jobs.queue) if item]
        yield c


def test_counts_up_to_the_threshold_then_enqueues_once(coord):
    assert coord.record("1", 1) is Outcome.COUNTED
    assert coord.record("1", 1) is Outcome.COUNTED
    assert coord.record("1", 1) is Outcome.ENQUEUED
    assert coord.record("1", 5) is Outcome.ALREADY_QUEUED
    assert coord.record("1", 0, force=True) is Outcome.ALREADY_QUEUED
    assert len(coord.queued_jobs()) == 1
    assert coord.status("1")["pending"] == 0


def test_annotations_during_a_run_schedule_exactly_one_followup(coord):
    coord.record("1", 0, force=True)
    (job,) = coord.queued_jobs()
    assert coord.job_started("1", job)
    assert coord.status("1")["queued"] is None and coord.status("1")["running"] == job
    for _ in range(4):
        outcome = coord.record("1", 3)
        assert outcome is Outcome.FOLLOWUP
    assert coord.job_finished("1", job) is True
    jobs = coord.queued_jobs()
    assert len(jobs) == 2 and jobs[-1] != job  # the original (already taken) + one follow-up
    assert coord.status("1")["followup"] is False
    follow = coord.status("1")["queued"]
    assert coord.job_started("1", follow)
    assert coord.job_finished("1", follow) is False  # nothing new arrived: no further run


def test_two_jobs_for_one_project_never_run_at_once(coord):
    assert coord.job_started("1", "job-a")
    assert not coord.job_started("1", "job-b")  # refused; a follow-up is recorded instead
    assert coord.status("1")["followup"] is True
    assert coord.job_started("2", "job-c")  # other projects are independent
    assert coord.job_finished("1", "job-a") is True


def test_status_is_per_project(coord):
    coord.record("1", 2)
    assert coord.status("1")["pending"] == 2 and coord.status("2")["pending"] == 0


def test_concurrent_webhooks_enqueue_exactly_one_job(redis_clean):
    coord = RedisCoordinator(redis_clean, threshold=10)
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda _: coord.record("5", 1), range(200)))
    assert outcomes.count(Outcome.ENQUEUED) == 1
    assert len(coord.queue) == 1


def test_a_lost_queued_job_does_not_block_training_forever(redis_clean, monkeypatch):
    import backend.queue as q

    monkeypatch.setattr(q, "LOST_JOB_GRACE_S", -1)
    coord = RedisCoordinator(redis_clean, threshold=1)
    assert coord.record("1", 1) is Outcome.ENQUEUED
    coord.queue.empty()  # the RQ job disappears (deleted by an admin, expired...)
    assert coord.record("1", 1) is Outcome.ENQUEUED


def test_a_killed_jobs_lock_expires(redis_clean, monkeypatch):
    import backend.queue as q

    monkeypatch.setattr(q, "LOCK_TTL_S", 1)
    coord = RedisCoordinator(redis_clean, threshold=1)
    assert coord.job_started("1", "killed-job")  # never finishes: the worker was SIGKILLed
    assert not coord.job_started("1", "next-job")
    time.sleep(1.2)
    assert coord.job_started("1", "next-job")


def test_redis_restart_drops_pending_work_and_the_next_event_retriggers(redis_clean):
    coord = RedisCoordinator(redis_clean, threshold=3)
    coord.record("1", 2)
    redis.Redis.from_url(redis_clean).flushall()  # what a restart without persistence looks like
    assert coord.status("1")["pending"] == 0
    assert coord.record("1", 0, force=True) is Outcome.ENQUEUED  # START_TRAINING re-triggers


def test_embedded_queue_runs_jobs_on_its_thread_one_at_a_time():
    seen: list[tuple[str, str]] = []
    running = threading.Event()
    release = threading.Event()
    coord: MemoryCoordinator

    def job(project: str, job_id: str) -> None:
        assert coord.job_started(project, job_id)
        try:
            seen.append((project, job_id))
            running.set()
            release.wait(10)
        finally:
            coord.job_finished(project, job_id)

    coord = MemoryCoordinator(2, job)
    assert coord.record("1", 2) is Outcome.ENQUEUED
    assert running.wait(5)
    assert coord.record("1", 5) is Outcome.FOLLOWUP
    release.set()
    assert coord.wait_idle(10)
    assert len(seen) == 2 and seen[0][1] != seen[1][1]
    coord.close()
