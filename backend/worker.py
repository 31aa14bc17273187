"""``dpal worker``: an RQ worker for the ``dpal`` queue.

On CPU the backbone is loaded once in the parent before RQ forks a work-horse per job, so every job
starts with it in (copy-on-write) memory. CUDA cannot be initialised before a fork, so on a GPU
the jobs run in the worker process itself (``SimpleWorker``) and the backbone stays loaded there.
"""

from __future__ import annotations

import logging

from backend.queue import QUEUE_NAME
from backend.settings import Settings

log = logging.getLogger(__name__)


def run_worker(settings: Settings, burst: bool = False) -> int:
    """Run until stopped (or until the queue is empty with ``burst``). Returns an exit code."""
    if not settings.redis_url:
        log.error("dpal worker needs REDIS_URL; without it the server trains on its embedded queue")
        return 2
    import torch
    from redis import Redis
    from rq import Queue, SimpleWorker, Worker

    from backend.jobs import worker_context

    gpu = settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())
    if not gpu:
        worker_context()  # preload the backbone before forking
    connection = Redis.from_url(settings.redis_url)
    worker_class = SimpleWorker if gpu else Worker
    worker = worker_class([Queue(QUEUE_NAME, connection=connection)], connection=connection)
    log.info("dpal worker (%s) listening on queue %r", worker_class.__name__, QUEUE_NAME)
    worker.work(burst=burst, with_scheduler=True)
    return 0
