"""Label Studio REST access for the retrain job, through ``label-studio-sdk``, with bounded retries.

Every call is retried on connection errors, timeouts and HTTP 5xx/408/429 with exponential backoff
(``RetryPolicy``); the SDK's own retries are switched off (``max_retries=0``) so that one policy,
with delays the job can choose, applies everywhere. After the last try the call raises
:class:`LabelStudioUnavailable` saying what failed, how often and the last answer; 4xx answers are
not retried and raise :class:`LabelStudioError` with a hint. Messages never contain the API key.

Tasks are listed page by page (``GET /api/tasks/?project=&fields=all``) and reduced to what the job
needs (:class:`TaskRecord`) as each page arrives, so a pool of 100k tasks is never held as SDK
objects. Predictions go in one ``POST /api/projects/{id}/import/predictions`` per chunk.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from label_studio_sdk import LabelStudio
from label_studio_sdk.core.api_error import ApiError

if TYPE_CHECKING:
    from backend.settings import Settings

log = logging.getLogger(__name__)
T = TypeVar("T")
RETRYABLE_STATUS = frozenset({408, 429})


class LabelStudioError(RuntimeError):
    """Label Studio refused a call (4xx) or answered something unusable. Safe to log."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status  # the HTTP status when Label Studio answered one


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio stayed unreachable or kept answering 5xx through every retry."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff: ``base_s * 2**i`` (capped at ``max_s``, +-10 % jitter) between tries."""

    attempts: int = 6  # tries in all, the first included
    base_s: float = 1.0
    max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1 or self.base_s < 0 or self.max_s < 0:
            raise ValueError("RetryPolicy needs attempts >= 1 and non-negative delays")

    def delay(self, retry: int) -> float:
        return min(self.max_s, self.base_s * 2.0**retry) * (0.9 + 0.2 * random.random())


@dataclass(frozen=True)
class ProjectInfo:
    id: int
    title: str
    label_config: str
    model_version: str  # the version whose predictions Label Studio shows and orders by


@dataclass(frozen=True)
class TaskRecord:
    """What the job keeps of a task."""

    id: int
    data: dict[str, Any]
    annotations: list[dict[str, Any]]  # as Label Studio returns them (result, was_cancelled, ...)
    prediction_versions: frozenset[str] = field(default_factory=frozenset)  # model_version of each prediction


def _get(obj: Any, name: str, default: Any = None) -> Any:
    """A field of an SDK model or of a plain dict."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


def _as_dict(obj: Any) -> dict[str, Any]:
    if isinstance(obj, dict):
        return obj
    dump = getattr(obj, "model_dump", None) or getattr(obj, "dict", None)
    return dict(dump()) if dump else {}


def task_record(item: Any) -> TaskRecord:
    """Reduce one task of the task list (SDK model or dict) to a :class:`TaskRecord`."""
    predictions = _get(item, "predictions") or []
    versions = frozenset(str(v) for v in (_get(p, "model_version") for p in predictions) if v)
    return TaskRecord(
        id=int(_get(item, "id")),
        data=dict(_get(item, "data") or {}),
        annotations=[_as_dict(a) for a in (_get(item, "annotations") or [])],
        prediction_versions=versions,
    )


class LabelStudioClient:
    """The few Label Studio calls the job makes. One per process; not thread-safe.

    Args:
        url: ``LABEL_STUDIO_URL``.
        api_key: legacy token or personal access token (the SDK handles both).
        timeout_s: per request.
        retry: backoff policy for transient failures.
        transport: an httpx transport instead of the network (tests).
    """

    def __init__(
        self,
        url: str,
        api_key: str | None,
        *,
        timeout_s: float = 60.0,
        retry: RetryPolicy = RetryPolicy(),
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.retry = retry
        self._transport = transport
        self._sleep = sleep
        self._sdk: LabelStudio | None = None
        self._http: httpx.Client | None = None

    @classmethod
    def from_settings(
        cls, settings: Settings, *, timeout_s: float = 60.0, retry: RetryPolicy = RetryPolicy()
    ) -> LabelStudioClient:
        return cls(settings.label_studio_url, settings.label_studio_api_key, timeout_s=timeout_s, retry=retry)

    def __repr__(self) -> str:  # the key stays out of logs and tracebacks
        return f"LabelStudioClient(url={self.url!r})"

    @property
    def sdk(self) -> LabelStudio:
        if self._sdk is None:
            if not self._api_key:
                raise LabelStudioError(
                    "LABEL_STUDIO_API_KEY is not set: the worker needs a Label Studio access token "
                    "to read annotations and push predictions"
                )
            self._http = httpx.Client(
                timeout=self.timeout_s, trust_env=False, follow_redirects=False, transport=self._transport
            )
            self._sdk = LabelStudio(
                base_url=self.url, api_key=self._api_key, httpx_client=self._http, max_retries=0
            )
        return self._sdk

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
        self._sdk = self._http = None

    def __enter__(self) -> LabelStudioClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- calls ------------------------------------------------------------------------------

    def get_project(self, project_id: int) -> ProjectInfo:
        p = self._call(f"GET /api/projects/{project_id}", lambda: self.sdk.projects.get(id=project_id))
        config = _get(p, "label_config") or ""
        return ProjectInfo(
            int(_get(p, "id") or project_id),
            str(_get(p, "title") or ""),
            config,
            _get(p, "model_version") or "",
        )

    def iter_task_pages(
        self,
        project_id: int,
        page_size: int = 1000,
        task_ids: Sequence[int] | None = None,
        attempts: int | None = None,
    ) -> Iterator[list[TaskRecord]]:
        """Pages of the project's tasks (all, or only ``task_ids``) with annotations and predictions.

        ``attempts`` overrides the retry policy's number of tries per page.
        """
        query = None
        if task_ids is not None:
            query = json.dumps({"selectedItems": {"all": False, "included": [int(t) for t in task_ids]}})
        seen = 0
        page = 1
        while True:
            where = f"GET /api/tasks/?project={project_id}&page={page}"
            try:
                pager = self._call(
                    where,
                    lambda p=page: self.sdk.tasks.list(
                        project=project_id, fields="all", page=p, page_size=page_size, query=query
                    ),
                    attempts,
                )
            except LabelStudioError as exc:
                if page > 1 and exc.status == 404:  # tasks deleted while paging: the end moved
                    return
                raise
            items = pager.items or []
            if not items:
                return
            records = [task_record(t) for t in items]
            seen += len(records)
            yield records
            total = _get(pager.response, "total")
            if total is not None and seen >= int(total):
                return
            page += 1

    def list_tasks(
        self,
        project_id: int,
        page_size: int = 1000,
        on_page: Callable[[int, int | None], None] | None = None,
    ) -> list[TaskRecord]:
        """Every task of the project (deduplicated by id, in Label Studio's order)."""
        out: dict[int, TaskRecord] = {}
        for records in self.iter_task_pages(project_id, page_size):
            for r in records:
                out[r.id] = r
            if on_page:
                on_page(len(out), None)
        return list(out.values())

    def import_predictions(self, project_id: int, predictions: Sequence[dict[str, Any]]) -> int:
        """POST one chunk of predictions; returns how many Label Studio created.

        Not retried here: a lost answer may still have created them. :func:`push_predictions`
        re-reads the chunk's tasks before trying again, so nothing is created twice.
        """
        resp = self._call(
            f"POST /api/projects/{project_id}/import/predictions",
            lambda: self.sdk.projects.import_predictions(id=project_id, request=list(predictions)),  # type: ignore[arg-type]
            attempts=1,
        )
        created = _get(resp, "created")
        return int(created) if created is not None else len(predictions)

    def set_model_version(self, project_id: int, model_version: str) -> None:
        """Select ``model_version`` in the project (Prediction score column and ordering use it)."""
        self._call(
            f"PATCH /api/projects/{project_id} model_version",
            lambda: self.sdk.projects.update(id=project_id, model_version=model_version),
        )

    # ---- retries ----------------------------------------------------------------------------

    def _call(self, what: str, fn: Callable[[], T], attempts: int | None = None) -> T:
        tries = attempts or self.retry.attempts
        last = ""
        for i in range(tries):
            try:
                return fn()
            except ApiError as exc:
                status = exc.status_code or 0
                last = f"HTTP {status}: {_body_text(exc.body)}"
                if status < 500 and status not in RETRYABLE_STATUS:
                    raise LabelStudioError(f"{what} failed: {last}{_hint(status)}", status) from None
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}: {_scrub(str(exc), self._api_key) or 'no answer'}"
            except json.JSONDecodeError:
                last = "the answer is not JSON"
            if i + 1 < tries:
                delay = self.retry.delay(i)
                log.warning("%s: %s; retry %d/%d in %.1fs", what, last, i + 1, tries - 1, delay)
                self._sleep(delay)
        raise LabelStudioUnavailable(
            f"{what} failed after {tries} tries; last error: {last}. Is Label Studio up at {self.url}?"
        )


def _body_text(body: Any, limit: int = 300) -> str:
    text = body if isinstance(body, str) else json.dumps(body, default=str)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (check LABEL_STUDIO_API_KEY: the token was refused or lacks access to this project)"
    if status == 404:
        return " (no such project or task in Label Studio; was it deleted?)"
    return ""


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text
