"""Retraining coordination: count annotations, enqueue at most one job per project, never run two.

Per project there are four facts, changed only by atomic steps (Lua scripts in Redis, or one lock
in memory):

- ``pending``  new annotations since the last enqueue;
- ``queued``   the id of the job waiting in the queue (at most one);
- ``running``  the id of the job holding the run lock (at most one; a TTL refreshed by heartbeats,
               so a killed worker's lock expires by itself);
- ``followup`` annotations arrived while a job was running: exactly one more run when it ends.

With ``REDIS_URL`` jobs go to the RQ queue ``dpal`` for ``dpal worker`` processes (any number, on any
machine). Without it, an embedded queue runs the same jobs on one background thread of the server.

Redis restarted: the four facts and the RQ queue are gone together, so a queued job is dropped
with them. Nothing is lost for good: annotations live in Label Studio, and the next annotation or a
``START_TRAINING`` event re-triggers a run that trains on all of them.
"""

from __future__ import annotations

import logging
import queue as _stdqueue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

log = logging.getLogger(__name__)

QUEUE_NAME = "dpal"
JOB_FUNCTION = "backend.jobs.train_project_job"
LOCK_TTL_S = 120  # a running job refreshes it; a killed one frees the project within this time
QUEUED_TTL_S = 24 * 3600  # safety net: a 'queued' flag never outlives a day
JOB_TIMEOUT_S = 6 * 3600
LOST_JOB_GRACE_S = 30  # a 'queued' flag without its RQ job this long after enqueueing is stale


class Outcome(str, Enum):
    COUNTED = "counted"  # below the threshold
    ENQUEUED = "enqueued"  # a new job was queued
    ALREADY_QUEUED = "already_queued"  # the waiting job will train on these annotations too
    FOLLOWUP = "followup"  # a job is running; one follow-up run is scheduled for when it ends


def new_job_id(project: str) -> str:
    return f"dpal-train-{project}-{uuid.uuid4().hex[:12]}"


class Coordinator:
    """Interface shared by the Redis and in-memory coordinators."""

    threshold: int

    def record(self, project: str, new_annotations: int, force: bool = False) -> Outcome:
        """Count ``new_annotations``; enqueue a run when the threshold is reached or ``force``."""
        raise NotImplementedError

    def job_started(self, project: str, job_id: str) -> bool:
        """Take the run lock. False: another job runs; a follow-up is recorded, exit quietly."""
        raise NotImplementedError

    def heartbeat(self, project: str, job_id: str) -> None:
        raise NotImplementedError

    def job_finished(self, project: str, job_id: str) -> bool:
        """Release the lock; enqueue the follow-up if one is due. True when it did."""
        raise NotImplementedError

    def status(self, project: str) -> dict[str, Any]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop background work (embedded worker); no-op for Redis."""


# ---- Redis ------------------------------------------------------------------------------------

_RECORD = """
local pending = redis.call('INCRBY', KEYS[1], ARGV[1])
if pending < tonumber(ARGV[2]) and ARGV[3] ~= '1' then return {'counted', pending} end
redis.call('SET', KEYS[1], 0)
if redis.call('EXISTS', KEYS[2]) == 1 then return {'already_queued', 0} end
if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('SET', KEYS[4], 1) return {'followup', 0} end
redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
return {'enqueued', 0}
"""

_STARTED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('EXPIRE', KEYS[2], ARGV[2]) return 1 end
redis.call('SET', KEYS[3], 1)
return 0
"""

_HEARTBEAT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

_FINISHED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) then
  redis.call('DEL', KEYS[2])
  if redis.call('EXISTS', KEYS[3]) == 0 then redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3]) return 1 end
end
return 0
"""

_UNQUEUE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _keys(project: str) -> dict[str, str]:
    base = f"dpal:project:{project}:"
    return {k: base + k for k in ("pending", "queued", "running", "followup")}


class RedisCoordinator(Coordinator):
    """Coordination in Redis; jobs on the RQ queue ``dpal``."""

    def __init__(self, redis_url: str, threshold: int, job_function: str = JOB_FUNCTION) -> None:
        from redis import Redis
        from rq import Queue

        self.threshold = threshold
        self.redis = Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
        self.queue = Queue(QUEUE_NAME, connection=self.redis)
        self.job_function = job_function
        self._record = self.redis.register_script(_RECORD)
        self._started = self.redis.register_script(_STARTED)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._finished = self.redis.register_script(_FINISHED)
        self._unqueue = self.redis.register_script(_UNQUEUE)

    def ping(self) -> bool:
        return bool(self.redis.ping())

    def record(self, project: str, new_annotations: int, force: bool = False) -> Outcome:
        # One Lua round trip in the common case; the lost-job check only runs when a job looks
        # queued, so webhooks stay fast under bursts.
        result = self._record_once(project, new_annotations, force)
        if result is Outcome.ALREADY_QUEUED and self._forget_lost_job(project):
            result = self._record_once(project, 0, force=True)
        return result

    def _record_once(self, project: str, new_annotations: int, force: bool) -> Outcome:
        k = _keys(project)
        job_id = new_job_id(project)
        outcome, _ = self._record(
            keys=[k["pending"], k["queued"], k["running"], k["followup"]],
            args=[max(0, int(new_annotations)), self.threshold, "1" if force else "0", job_id, QUEUED_TTL_S],
        )
        result = Outcome(outcome.decode() if isinstance(outcome, bytes) else outcome)
        if result is Outcome.ENQUEUED:
            self._enqueue(project, job_id)
        return result

    def _enqueue(self, project: str, job_id: str) -> None:
        from rq import Retry

        try:
            self.queue.enqueue(
                self.job_function,
                project,
                job_id=job_id,
                job_timeout=JOB_TIMEOUT_S,
                result_ttl=24 * 3600,
                failure_ttl=7 * 24 * 3600,
                retry=Retry(max=2, interval=[10, 60]),
                description=f"retrain project {project}",
            )
        except Exception:
            self._unqueue(keys=[_keys(project)["queued"]], args=[job_id])  # do not block later runs
            raise
        log.info("project %s: enqueued training job %s", project, job_id)

    def _forget_lost_job(self, project: str) -> bool:
        """A 'queued' flag whose RQ job is gone (deleted, expired, failed) must not block runs.

        Returns True when a stale flag was cleared."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        key = _keys(project)["queued"]
        raw = self.redis.get(key)
        if not raw:
            return False
        job_id = raw.decode()
        try:
            status = Job.fetch(job_id, connection=self.redis).get_status()
        except NoSuchJobError:
            # The flag is set a moment before the RQ job exists: only an old flag is a lost job.
            age = QUEUED_TTL_S - max(0, self.redis.ttl(key))
            status = None if age > LOST_JOB_GRACE_S else JobStatus.QUEUED
        if status in (None, JobStatus.FAILED, JobStatus.FINISHED, JobStatus.CANCELED, JobStatus.STOPPED):
            log.warning("project %s: queued job %s is gone (%s); queueing a new one", project, job_id, status)
            return bool(self._unqueue(keys=[key], args=[job_id]))
        return False

    def job_started(self, project: str, job_id: str) -> bool:
        k = _keys(project)
        return bool(self._started(keys=[k["queued"], k["running"], k["followup"]], args=[job_id, LOCK_TTL_S]))

    def heartbeat(self, project: str, job_id: str) -> None:
        self._heartbeat(keys=[_keys(project)["running"]], args=[job_id, LOCK_TTL_S])

    def job_finished(self, project: str, job_id: str) -> bool:
        k = _keys(project)
        follow = new_job_id(project)
        if self._finished(
            keys=[k["running"], k["followup"], k["queued"]], args=[job_id, follow, QUEUED_TTL_S]
        ):
            self._enqueue(project, follow)
            return True
        return False

    def status(self, project: str) -> dict[str, Any]:
        k = _keys(project)
        pending, queued, running, followup = self.redis.mget(
            [k["pending"], k["queued"], k["running"], k["followup"]]
        )
        return {
            "backend": "redis",
            "threshold": self.threshold,
            "pending": int(pending or 0),
            "queued": queued.decode() if queued else None,
            "running": running.decode() if running else None,
            "followup": bool(followup),
        }


# ---- In memory (no Redis) ---------------------------------------------------------------------


@dataclass
class _ProjectState:
    pending: int = 0
    queued: str | None = None
    running: str | None = None
    running_until: float = 0.0
    followup: bool = False


@dataclass
class MemoryCoordinator(Coordinator):
    """The same state machine in one process, with one background worker thread.

    ``run_job(project, job_id)`` is what the thread executes (the server passes a function that
    trains with its already-loaded backbone).
    """

    threshold: int
    run_job: Callable[[str, str], Any]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _states: dict[str, _ProjectState] = field(default_factory=dict)
    _jobs: _stdqueue.Queue = field(default_factory=_stdqueue.Queue)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dpal-embedded-worker", daemon=True)
        self._thread.start()

    def _state(self, project: str) -> _ProjectState:
        return self._states.setdefault(project, _ProjectState())

    def record(self, project: str, new_annotations: int, force: bool = False) -> Outcome:
        with self._lock:
            s = self._state(project)
            s.pending += max(0, int(new_annotations))
            if s.pending < self.threshold and not force:
                return Outcome.COUNTED
            s.pending = 0
            if s.queued:
                return Outcome.ALREADY_QUEUED
            if s.running and s.running_until > time.monotonic():
                s.followup = True
                return Outcome.FOLLOWUP
            s.queued = new_job_id(project)
            self._jobs.put((project, s.queued))
            return Outcome.ENQUEUED

    def job_started(self, project: str, job_id: str) -> bool:
        with self._lock:
            s = self._state(project)
            if s.queued == job_id:
                s.queued = None
            if s.running in (None, job_id) or s.running_until <= time.monotonic():
                s.running, s.running_until = job_id, time.monotonic() + LOCK_TTL_S
                return True
            s.followup = True
            return False

    def heartbeat(self, project: str, job_id: str) -> None:
        with self._lock:
            s = self._state(project)
            if s.running == job_id:
                s.running_until = time.monotonic() + LOCK_TTL_S

    def job_finished(self, project: str, job_id: str) -> bool:
        with self._lock:
            s = self._state(project)
            if s.running == job_id:
                s.running, s.running_until = None, 0.0
            if s.followup:
                s.followup = False
                if not s.queued:
                    s.queued = new_job_id(project)
                    self._jobs.put((project, s.queued))
                    return True
            return False

    def status(self, project: str) -> dict[str, Any]:
        with self._lock:
            s = self._state(project)
            running = s.running if s.running_until > time.monotonic() else None
            return {
                "backend": "embedded",
                "threshold": self.threshold,
                "pending": s.pending,
                "queued": s.queued,
                "running": running,
                "followup": s.followup,
            }

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Block until no job is queued or running (tests, graceful shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                busy = any(s.queued or s.running for s in self._states.values()) or not self._jobs.empty()
            if not busy:
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._jobs.put(None)

    def _loop(self) -> None:
        while not self._stop.is_set():
            item = self._jobs.get()
            if item is None:
                return
            project, job_id = item
            try:
                self.run_job(project, job_id)
            except Exception:  # noqa: BLE001 - one failed job must not kill the queue
                log.exception("project %s: embedded training job %s failed", project, job_id)
                with self._lock:  # release what the job may not have released
                    s = self._state(project)
                    if s.running == job_id:
                        s.running, s.running_until = None, 0.0
                    if s.queued == job_id:
                        s.queued = None
