"""The ML-backend protocol through FastAPI's test client, with real Label Studio payloads."""

from __future__ import annotations

import logging

import pytest
import torch
from fastapi.testclient import TestClient

from backend.app import create_app
from backend.queue import RedisCoordinator
from backend.store import ModelStore
from dpal_core.backbone import load_backbone
from dpal_core.config import PromptConfig
from dpal_core.model import DualPromptCLIP
from tests.backend.conftest import ANIMAL_CONFIG, local_task

SECRET = "test-secret-key-0123456789"


class NoQueue:
    """Webhook tests use a real coordinator; the other tests must not train."""

    threshold = 10

    def record(self, *a, **k):
        raise AssertionError("no training expected in this test")

    def status(self, project):
        return {}

    def close(self):
        pass


@pytest.fixture()
def client(make_settings):
    with TestClient(create_app(make_settings(), coordinator=NoQueue())) as c:
        yield c


def predict_body(tasks, project="7.1700000000"):
    return {"tasks": tasks, "project": project, "label_config": ANIMAL_CONFIG, "params": {"context": None}}


def test_health(client):
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "UP" and r.json()["model_class"] == "DPALModel"


def test_setup_returns_a_stable_version_without_loading_a_model(make_settings):
    # A backbone that cannot load must not slow down or break /setup.
    settings = make_settings(DPAL_MODEL="no-such-org/no-such-clip")
    with TestClient(create_app(settings, coordinator=NoQueue())) as c:
        body = {"project": "7.1712345678", "schema": ANIMAL_CONFIG, "extra_params": None}
        first = c.post("/setup", json=body)
        again = c.post("/setup", json={**body, "project": "7.1799999999"})
    assert first.status_code == 200, first.text
    version = first.json()["model_version"]
    assert version.startswith("dpal-v0-")
    assert again.json()["model_version"] == version  # never reset by a new /setup


@pytest.mark.parametrize(
    "xml, fragment",
    [
        (
            "<View><Text name='t' value='$text'/><Choices name='c' toName='t'><Choice value='a'/>"
            "<Choice value='b'/></Choices></View>",
            "Image",
        ),
        ("<View><Image name='i' value='$image'/></View>", "Choices"),
        (
            "<View><Image name='i' value='$image'/><Choices name='c' toName='i' choice='multiple'>"
            "<Choice value='a'/><Choice value='b'/></Choices></View>",
            "multiple",
        ),
        ("<View><Image name='i' value='$image'", "XML"),
        ("", "empty"),
    ],
    ids=["text-object", "no-choices", "multiple-choice", "malformed", "empty"],
)
def test_unsupported_configs_get_400_naming_the_problem(client, xml, fragment):
    r = client.post("/setup", json={"project": "7.1", "schema": xml})
    assert r.status_code == 400
    assert fragment.lower() in r.json()["error"].lower()
    assert "Traceback" not in r.text


def test_malformed_requests_get_422_without_traceback(client):
    r = client.post("/predict", json={"tasks": "nope"})
    assert r.status_code == 422
    assert "tasks" in r.json()["error"] and "label_config" in r.json()["error"]
    r = client.post("/setup", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422


def test_predict_one_result_per_task_in_order_with_broken_images(client):
    tasks = [
        local_task(1, "imgs/red.png"),
        local_task(2, "imgs/empty.png"),
        local_task(3, "imgs/green.png"),
        local_task(4, "imgs/truncated.png"),
        local_task(5, "imgs/nope.png"),
        local_task(6, "../secret.png"),
        {"id": 7, "data": {"picture": "/data/local-files/?d=imgs/red.png"}},
        {"id": 8, "data": {"image": "file:///etc/passwd"}},
        local_task(9, "imgs/blue.png"),
    ]
    r = client.post("/predict", json=predict_body(tasks))
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert len(results) == len(tasks)
    good = {0, 2, 8}
    for i, res in enumerate(results):
        assert res["model_version"].startswith("dpal-v0-")
        if i in good:
            (item,) = res["result"]
            assert item["from_name"] == "animal" and item["to_name"] == "image" and item["type"] == "choices"
            assert item["value"]["choices"][0] in {"Bear", "Cat", "Dog"}
            assert 0.0 < res["score"] < 1.0
        else:
            assert res["result"] == [] and "score" not in res, (i, res)


def test_same_image_gives_same_score_and_is_cached(client):
    tasks = [local_task(1, "imgs/red.png"), local_task(2, "imgs/red.png")]
    a = client.post("/predict", json=predict_body(tasks)).json()["results"]
    b = client.post("/predict", json=predict_body(tasks[:1])).json()["results"]
    assert a[0]["score"] == a[1]["score"]
    assert b[0]["score"] == pytest.approx(a[0]["score"], abs=1e-5)  # cached vs batch-encoded
    service = client.app.state.service
    assert len(service.encoder().cache) == 1


def test_new_version_is_served_without_restart(client, make_settings, tiny_clip_dir):
    first = client.post("/predict", json=predict_body([local_task(1, "imgs/red.png")])).json()
    assert first["model_version"].startswith("dpal-v0-")
    settings = make_settings()
    backbone = load_backbone(str(tiny_clip_dir), device="cpu")
    torch.manual_seed(0)
    model = DualPromptCLIP(backbone, ["Bear", "Cat", "dog"], PromptConfig(n_ctx=4))
    info = ModelStore(settings.model_dir).publish("7", model, {"metrics": {"accuracy": 0.9}})
    second = client.post("/predict", json=predict_body([local_task(1, "imgs/red.png")])).json()
    assert second["model_version"] == info.model_version
    assert second["model_version"].startswith("dpal-v1-")
    assert second["results"][0]["model_version"] == info.model_version
    versions = client.get("/versions/7").json()
    assert versions["current"] == 1 and versions["versions"][0]["metrics"] == {"accuracy": 0.9}
    setup = client.post("/setup", json={"project": "7.2", "schema": ANIMAL_CONFIG}).json()
    assert setup["model_version"] == info.model_version


def test_empty_task_list(client):
    r = client.post("/predict", json=predict_body([]))
    assert r.status_code == 200 and r.json()["results"] == []


def test_basic_auth_on_every_endpoint_but_health(make_settings):
    settings = make_settings(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="pa55")
    with TestClient(create_app(settings, coordinator=NoQueue())) as c:
        assert c.get("/health").status_code == 200
        body = {"project": "7.1", "schema": ANIMAL_CONFIG}
        assert c.post("/setup", json=body).status_code == 401
        assert c.post("/setup", json=body, auth=("ls", "wrong")).status_code == 401
        assert c.post("/setup", json=body, auth=("ls", "pa55")).status_code == 200
        assert c.post("/webhook", json={"action": "X"}).status_code == 401
        assert c.get("/metrics").status_code == 401
        assert c.post("/predict", json=predict_body([])).status_code == 401


def test_no_traceback_and_no_secret_reach_the_client_or_the_log(make_settings, caplog):
    app = create_app(make_settings(), coordinator=NoQueue())

    async def boom(*args, **kwargs):
        raise RuntimeError(f"exploded while holding {SECRET}")

    app.state.service.predict = boom
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as c:
        r = c.post("/predict", json=predict_body([local_task(1, "imgs/red.png")]))
    assert r.status_code == 500
    assert "incident" in r.json()["error"]
    assert "Traceback" not in r.text and SECRET not in r.text and "exploded" not in r.text
    assert "exploded while holding ***" in caplog.text  # logged for the operator, key masked
    assert SECRET not in caplog.text


def test_api_key_never_logged_on_media_errors(make_settings, caplog):
    settings = make_settings(LOCAL_FILES_DOCUMENT_ROOT="")  # local files now go over HTTP to LS
    with caplog.at_level(logging.DEBUG), TestClient(create_app(settings, coordinator=NoQueue())) as c:
        r = c.post("/predict", json=predict_body([local_task(1, "imgs/red.png")]))
        assert r.status_code == 200 and r.json()["results"][0]["result"] == []
        assert SECRET not in r.text
    assert SECRET not in caplog.text


# ---- webhooks, counted against a real Redis --------------------------------------------------


@pytest.fixture()
def redis_client(make_settings, redis_clean):
    coordinator = RedisCoordinator(redis_clean, threshold=3)
    with TestClient(create_app(make_settings(), coordinator=coordinator)) as c:
        yield c, coordinator


def hook(action, project=7, **extra):
    return {"action": action, "project": {"id": project, "label_config": ANIMAL_CONFIG}, **extra}


def test_webhook_threshold_counting_and_coalescing(redis_client):
    c, coordinator = redis_client
    outcomes = [
        c.post("/webhook", json=hook("ANNOTATION_CREATED", annotation={"id": i})).json() for i in range(2)
    ]
    assert [o["training"] for o in outcomes] == ["counted", "counted"]
    assert (
        c.post("/webhook", json=hook("ANNOTATION_UPDATED", annotation={"id": 1})).json()["training"]
        == "enqueued"
    )
    assert len(coordinator.queue) == 1
    # More annotations while a job waits: no second job.
    for _ in range(5):
        c.post("/webhook", json=hook("ANNOTATION_CREATED"))
    assert len(coordinator.queue) == 1
    # Another project is independent.
    r = c.post("/webhook", json=hook("START_TRAINING", project=8)).json()
    assert r["training"] == "enqueued" and len(coordinator.queue) == 2
    assert c.post("/webhook", json=hook("START_TRAINING", project=8)).json()["training"] == "already_queued"


def test_bulk_events_count_every_annotation(redis_client):
    c, coordinator = redis_client
    r = c.post("/webhook", json=hook("ANNOTATIONS_CREATED", annotation=[{"id": 1}, {"id": 2}, {"id": 3}]))
    assert r.json()["training"] == "enqueued"
    c2 = coordinator.status("7")
    assert c2["queued"] and c2["pending"] == 0


def test_other_events_are_ignored_with_200(redis_client):
    c, coordinator = redis_client
    for action in ("PROJECT_UPDATED", "TASKS_CREATED", "SOMETHING_NEW"):
        r = c.post("/webhook", json=hook(action))
        assert r.status_code == 200 and r.json()["status"] == "ignored"
    assert len(coordinator.queue) == 0


def test_webhook_with_a_bad_project_is_a_400(redis_client):
    c, _ = redis_client
    r = c.post("/webhook", json={"action": "ANNOTATION_CREATED", "project": {"id": "../../etc"}})
    assert r.status_code == 400 and "project id" in r.json()["error"]
