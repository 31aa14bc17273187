"""The retrain job's parts, without Redis or workers: annotation rules, evaluation plan, refusal,
the Label Studio client's paging and retries, and the idempotent push."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fakes"))
from fake_labelstudio import FakeLabelStudio, iso  # noqa: E402

from backend.evaluation import plan_evaluation, refusal_reason, stratified_folds  # noqa: E402
from backend.labelconfig import parse_label_config  # noqa: E402
from backend.lsclient import (  # noqa: E402
    LabelStudioClient,
    LabelStudioError,
    LabelStudioUnavailable,
    RetryPolicy,
    TaskRecord,
)
from backend.rescore import PushSpec, prediction_payload, push_predictions  # noqa: E402
from backend.training_defaults import JobOptions  # noqa: E402
from backend.trainset import build_snapshot  # noqa: E402

CONFIG = """<View><Image name="image" value="$image"/>
  <Choices name="label" toName="image"><Choice value="cat"/><Choice value="dog" alias="Dog"/></Choices></View>"""
QUICK = RetryPolicy(attempts=3, base_s=0.0, max_s=0.0)


def ann(label=None, **fields):
    result = (
        []
        if label is None
        else [{"from_name": "label", "to_name": "image", "type": "choices", "value": {"choices": [label]}}]
    )
    return {"result": result, **fields}


def task(tid, anns=(), data=None, versions=()):
    return TaskRecord(
        tid,
        data if data is not None else {"image": f"/data/upload/{tid}.png"},
        list(anns),
        frozenset(versions),
    )


def test_snapshot_rules():
    cfg = parse_label_config(CONFIG)
    snap = build_snapshot(
        [
            task(1, [ann("cat")]),
            task(2, [ann("Dog", updated_at=iso(9), id=1), ann("cat", updated_at=iso(2), id=2)]),  # later wins
            task(
                3, [ann("cat", created_at=iso(1), id=5), ann("Dog", created_at=iso(1), id=6)]
            ),  # tie: higher id
            task(4, [ann("cat", was_cancelled=True)]),  # only a skip: still in the pool
            task(5, [ann(None)]),  # empty: handled by a human, not trained on
            task(6, [ann("horse")]),  # outside the config
            task(7, [ann("cat", updated_at=iso(1)), ann("horse", updated_at=iso(3))]),  # latest unusable
            task(8, []),
            task(9, [ann("cat")], data={"text": "no image"}),
        ],
        cfg,
    )
    assert snap.task_ids == [1, 2, 3] and snap.labels == [0, 1, 1]
    assert [t.id for t in snap.pool] == [4, 8] and snap.pool_urls == [
        "/data/upload/4.png",
        "/data/upload/8.png",
    ]
    assert snap.skipped == {
        "cancelled_annotations": 1,
        "empty_annotations": 1,
        "unknown_label": 2,
        "no_image_in_task_data": 1,
    }
    assert snap.unknown_labels == {"horse": 2}


def test_evaluation_plans():
    opts = JobOptions()
    assert plan_evaluation([0, 1, 0], opts).method == "none"
    kfold = plan_evaluation([0, 1] * 10, opts)
    assert kfold.name == "5-fold"
    assert sorted(np.concatenate(kfold.folds).tolist()) == list(range(20))
    assert all(set(np.asarray([0, 1] * 10)[f]) == {0, 1} for f in kfold.folds)  # stratified
    assert plan_evaluation([0, 1, 0, 1, 0], opts).name == "5-fold"
    hold = plan_evaluation([0, 1, 2, 3] * 100, opts)
    assert hold.method == "holdout" and len(hold.folds[0]) == 80
    assert len(hold.train_indices(400)) == 320
    folds = stratified_folds(np.array([0] * 7 + [1] * 3), 3, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(10))


def test_refusal_rule():
    opts = JobOptions(refuse_tolerance=0.1, refuse_min_eval=30)
    good = {"accuracy": 0.70, "n_eval": 50, "method": "5-fold", "final_loss": 1.0}
    assert refusal_reason(good, {"accuracy": 0.75, "n_eval": 40}, "served version 1", opts) is None
    worse = {**good, "accuracy": 0.60}
    reason = refusal_reason(worse, {"accuracy": 0.75, "n_eval": 40}, "served version 1", opts)
    assert reason and "0.600" in reason and "served version 1's 0.750" in reason
    assert refusal_reason(worse, {"accuracy": 0.75, "n_eval": 10}, "v1", opts) is None  # too few to judge
    assert refusal_reason({**worse, "n_eval": 10}, {"accuracy": 0.75, "n_eval": 40}, "v1", opts) is None
    assert "diverged" in refusal_reason({**good, "final_loss": float("nan")}, None, "", opts)


def test_job_options_overrides():
    o = JobOptions.from_overrides({"job": {"push_chunk": 7}, "train": {"epochs": 3}})
    assert o.push_chunk == 7 and o.train == {"epochs": 3} and o.shard_size == JobOptions().shard_size
    with pytest.raises(ValueError, match="unknown job options"):
        JobOptions.from_overrides({"job": {"nope": 1}})
    with pytest.raises(ValueError, match="override sections"):
        JobOptions.from_overrides({"model": {}})


@pytest.fixture()
def ls():
    with FakeLabelStudio() as fake:
        yield fake


def test_client_pages_through_tasks_and_retries_5xx(ls):
    pid = ls.add_project(CONFIG)
    ids = [ls.add_task(pid, {"image": f"/data/upload/{i}.png"}) for i in range(5)]
    ls.fail("GET", r"^/api/tasks", status=503, times=1)
    ls.fail("GET", r"^/api/tasks", drop=True, times=1)
    sleeps: list[float] = []
    client = LabelStudioClient(ls.url, ls.token, retry=RetryPolicy(4, 0.5, 1.0), sleep=sleeps.append)
    tasks = client.list_tasks(pid, page_size=2)
    assert [t.id for t in tasks] == ids
    pages = [c.query.get("page") for c in ls.calls_to("GET", r"^/api/tasks") if c.status == 200]
    assert pages == ["1", "2", "3"]  # stops at the total: never asks for the 404 page
    assert len(sleeps) == 2 and 0.45 <= sleeps[0] <= 0.55 and 0.9 <= sleeps[1] <= 1.1  # backoff doubles
    assert client.get_project(pid).label_config == CONFIG


def test_client_errors_are_clear_and_never_show_the_key(ls):
    pid = ls.add_project(CONFIG)
    wrong = LabelStudioClient(ls.url, "wrong-secret-token-123", retry=QUICK)
    with pytest.raises(LabelStudioError, match="HTTP 401.*LABEL_STUDIO_API_KEY") as exc:
        wrong.get_project(pid)
    assert not isinstance(exc.value, LabelStudioUnavailable) and "wrong-secret" not in str(exc.value)
    assert len(ls.calls_to("GET", r"^/api/projects/")) == 1  # 4xx is not retried
    assert "wrong-secret" not in repr(wrong)
    down = LabelStudioClient("http://127.0.0.1:9", "wrong-secret-token-123", retry=QUICK)
    with pytest.raises(LabelStudioUnavailable, match="after 3 tries.*ConnectError") as exc:
        down.get_project(1)
    assert "wrong-secret" not in str(exc.value)
    with pytest.raises(LabelStudioError, match="LABEL_STUDIO_API_KEY is not set"):
        LabelStudioClient(ls.url, None).get_project(pid)


def test_push_never_duplicates_after_a_lost_answer(ls):
    pid = ls.add_project(CONFIG)
    ids = [ls.add_task(pid, {"image": f"/data/upload/{i}.png"}) for i in range(7)]
    spec = PushSpec("label", "image", ("cat", "Dog"))
    preds = [prediction_payload(t, spec, t % 2, 0.5, "v-1") for t in ids]
    ls.fail("POST", r"/import/predictions$", lose_answer=True, times=1)  # created, but no answer
    ls.fail("POST", r"/import/predictions$", status=503, times=1)
    client = LabelStudioClient(ls.url, ls.token, retry=QUICK)
    done: list[tuple[int, int]] = []
    out = push_predictions(
        client, pid, preds, "v-1", 3, QUICK, lambda d, t: done.append((d, t)), sleep=lambda s: None
    )
    assert out.pushed == 7 and out.found == 3 and out.created == 4
    assert [len(ls.predictions(t)) for t in ids] == [1] * 7
    assert done == [(3, 7), (6, 7), (7, 7)]
    assert ls.predictions(ids[1])[0]["result"][0]["value"] == {"choices": ["Dog"]}  # the alias is sent

    again = push_predictions(client, pid, preds, "v-1", 3, QUICK, verify_first=True)
    assert again.found == 7 and again.created == 0  # a shard re-run pushes nothing twice
    assert [len(ls.predictions(t)) for t in ids] == [1] * 7

    ls.fail("POST", r"/import/predictions$", status=503, times=None)
    with pytest.raises(LabelStudioUnavailable, match="after 3 tries"):
        push_predictions(
            client,
            pid,
            [prediction_payload(ids[0], spec, 0, 0.4, "v-2")],
            "v-2",
            3,
            QUICK,
            sleep=lambda s: None,
        )
    ls.clear_faults()
    with pytest.raises(LabelStudioError, match="HTTP 400"):  # a task of another project: not retried
        push_predictions(client, pid, [prediction_payload(999, spec, 0, 0.4, "v-2")], "v-2", 3, QUICK)


def test_embedded_job_runs_on_the_servers_backbone(ls, backbone, tmp_path, tiny_clip_dir, monkeypatch):
    """No Redis: the server's embedded queue calls run_embedded_job with its own service object."""
    from types import SimpleNamespace

    from backend.jobs import run_embedded_job
    from backend.queue import MemoryCoordinator
    from backend.settings import Settings
    from backend.store import ModelStore

    pid = ls.add_project(CONFIG)
    for i in range(6):
        ls.add_task(pid, {"image": "data:image/png;base64," + _PNG}, [ann("cat" if i % 2 else "Dog")])
    pool = [ls.add_task(pid, {"image": "data:image/png;base64," + _PNG}) for _ in range(2)]
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_URL": ls.url,
            "LABEL_STUDIO_API_KEY": ls.token,
            "DPAL_MODEL": str(tiny_clip_dir),
            "MODEL_DIR": str(tmp_path / "models"),
            "DPAL_DEVICE": "cpu",
        }
    )
    coordinator = MemoryCoordinator(10, lambda project, job_id: None)
    service = _Service(settings, SimpleNamespace(get=lambda timeout=None: backbone), coordinator)
    assert coordinator.job_started(str(pid), "other")  # another job runs: this one must not
    assert run_embedded_job(str(pid), "embedded-1", service)["status"] == "skipped"
    coordinator.job_finished(str(pid), "other")
    out = run_embedded_job(str(pid), "embedded-2", service, {"train": {"target_steps": 10}})
    coordinator.close()
    assert out["status"] == "published" and out["rescore"]["pushed"] == 2
    assert ModelStore(settings.model_dir).current_version(str(pid)) == 1
    assert all(len(ls.predictions(t)) == 1 for t in pool)
    assert coordinator.status(str(pid))["running"] is None


class _Service:  # the parts of the server's DPALModel the embedded job uses
    def __init__(self, settings, holder, coordinator):
        self.settings, self.holder, self.coordinator = settings, holder, coordinator


def _png() -> str:
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 30, 30)).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


_PNG = _png()


def test_context_shrinks_to_fit_a_short_text_encoder(backbone):
    from backend.retrain import JobError, fit_context
    from dpal_core.config import PromptConfig
    from dpal_core.model import DualPromptCLIP
    from dpal_core.prompts import max_context_tokens

    names = ["cat", "dog", "spotted cat"]
    room = max_context_tokens(backbone.model, backbone.tokenizer, names)
    assert 1 <= room < 32  # the tiny encoder has 32 positions
    wide = PromptConfig(n_ctx=room + 5)
    fitted = fit_context(wide, backbone, names, explicit=False)
    assert fitted.n_ctx == room and fitted.paradigm == wide.paradigm
    DualPromptCLIP(backbone, names, fitted)  # builds: the prompts fit
    assert fit_context(PromptConfig(n_ctx=2), backbone, names, explicit=False).n_ctx == 2
    with pytest.raises(JobError, match="do not fit"):
        fit_context(wide, backbone, names, explicit=True)  # an explicit choice is never overridden
    with pytest.raises(JobError, match="room for 0"):
        fit_context(PromptConfig(n_ctx=1), backbone, ["word " * 40], explicit=False)
