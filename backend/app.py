"""The HTTP face of the backend: the Label Studio ML-backend protocol on FastAPI.

Endpoints: ``GET /health``, ``POST /setup``, ``POST /predict``, ``POST /webhook``, ``GET /metrics``,
``GET /versions/{project}``. Errors are mapped to status codes in one place (``_error_handlers``);
no traceback ever reaches a client, and secrets never appear in a response or a log line.
"""

from __future__ import annotations

import logging
import secrets
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, ConfigDict, Field

from backend.labelconfig import LabelConfigError, TaskDataError
from backend.queue import Coordinator
from backend.redact import install_secret_redaction
from backend.service import BackboneNotReady, DPALModel
from backend.settings import Settings
from backend.store import StoreError
from dpal_core.errors import CheckpointError, DpalError

log = logging.getLogger(__name__)
MODEL_CLASS = "DPALModel"


class SetupRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    project: str | int = Field(description="'<project id>.<timestamp>' as Label Studio sends it")
    schema_: str = Field(alias="schema", description="the project's label config XML")
    extra_params: Any = None


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    tasks: list[dict[str, Any]] = Field(max_length=10_000)
    project: str | int | None = None
    label_config: str
    params: dict[str, Any] | None = None


class WebhookRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    action: str = Field(max_length=100)
    project: dict[str, Any] | int | str | None = None


def create_app(
    settings: Settings, coordinator: Coordinator | None = None, model: DPALModel | None = None
) -> FastAPI:
    """Build the app. ``coordinator`` defaults to RQ (REDIS_URL) or the embedded queue."""
    install_secret_redaction([settings.label_studio_api_key, settings.basic_auth_pass])
    service = model or DPALModel(settings, coordinator)
    if service.coordinator is None:
        service.coordinator = make_default_coordinator(settings, service)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.start()
        yield
        service.coordinator.close()
        await service.fetcher.aclose()

    app = FastAPI(title="DPAL ML backend", version="0.1.0", lifespan=lifespan)
    app.state.service = service
    basic = HTTPBasic(auto_error=False)

    async def authorise(credentials: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if not settings.basic_auth_enabled:
            return
        ok = credentials is not None and (
            secrets.compare_digest(credentials.username.encode(), (settings.basic_auth_user or "").encode())
            & secrets.compare_digest(credentials.password.encode(), (settings.basic_auth_pass or "").encode())
        )
        if not ok:
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Basic"})

    guarded = [Depends(authorise)]

    @app.get("/health")
    @app.get("/")
    def health() -> dict[str, Any]:
        return {"status": "UP", "model_class": MODEL_CLASS, "backbone": service.holder.state}

    @app.post("/setup", dependencies=guarded)
    def setup(req: SetupRequest) -> dict[str, Any]:
        return {"model_version": service.setup(req.project, req.schema_)}

    @app.post("/predict", dependencies=guarded)
    async def predict(req: PredictRequest) -> dict[str, Any]:
        return await service.predict(req.tasks, req.project, req.label_config)

    @app.post("/webhook", dependencies=guarded)
    async def webhook(req: WebhookRequest) -> dict[str, Any]:
        # On the event loop on purpose: one sub-millisecond Redis script, no threadpool hop.
        return service.webhook(req.action, req.model_dump(by_alias=True))

    @app.get("/metrics", dependencies=guarded)
    def metrics() -> dict[str, Any]:
        return {"counters": dict(service.counters), "backbone": service.holder.state}

    @app.get("/versions/{project}", dependencies=guarded)
    def versions(project: str) -> dict[str, Any]:
        return service.versions(project)

    _error_handlers(app)
    return app


def make_default_coordinator(settings: Settings, service: DPALModel) -> Coordinator:
    """RQ on Redis when REDIS_URL is set, else the embedded single-thread queue."""
    from backend.queue import MemoryCoordinator, RedisCoordinator

    if settings.redis_url:
        return RedisCoordinator(settings.redis_url, settings.train_threshold)

    def run_job(project: str, job_id: str) -> None:
        from backend.jobs import run_embedded_job

        run_embedded_job(project, job_id, service)

    return MemoryCoordinator(settings.train_threshold, run_job)


def _error_handlers(app: FastAPI) -> None:
    def reply(status: int, message: str) -> JSONResponse:
        return JSONResponse({"status": "error", "error": message}, status_code=status)

    @app.exception_handler(LabelConfigError)
    async def _label_config(_: Request, exc: LabelConfigError) -> JSONResponse:
        return reply(400, f"label config not supported: {exc}")

    @app.exception_handler(TaskDataError)
    @app.exception_handler(StoreError)
    @app.exception_handler(CheckpointError)
    async def _bad_request(_: Request, exc: Exception) -> JSONResponse:
        return reply(400, str(exc))

    @app.exception_handler(BackboneNotReady)
    async def _not_ready(_: Request, exc: BackboneNotReady) -> JSONResponse:
        return reply(503, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}"
            for e in exc.errors()
        )
        return reply(422, f"invalid request: {problems}")

    @app.exception_handler(DpalError)
    async def _dpal(_: Request, exc: DpalError) -> JSONResponse:
        return reply(400, str(exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        incident = uuid.uuid4().hex[:12]
        log.exception("unexpected error on %s %s (incident %s)", request.method, request.url.path, incident)
        return reply(500, f"internal error (incident {incident}); see the backend log")
