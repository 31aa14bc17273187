"""``make demo``: Label Studio, Redis, the DPAL backend and a worker on this machine, no Docker.

It starts (each in its own process group, stopped together on Ctrl-C):

- Label Studio 1.23.2 from its own cached venv (``tests/e2e/labelstudio.py``), on 127.0.0.1;
- ``redis-server`` on a free loopback port when it is installed (else the backend's embedded
  queue trains inside the server process);
- ``dpal serve`` (the ML backend) and, with Redis, one ``dpal worker``;

then creates the project "DPAL demo (animal-mnist)" with 200 animal-mnist images (PNG files served
by Label Studio from a local storage), connects the backend, retrieves predictions, selects the
backend's version in the project, prints the URL, the login and what to do, and follows the
retraining in this terminal.

Backbone: ``DPAL_MODEL`` when set; else the real CLIP (``openai/clip-vit-base-patch16``) when it is
already in the Hugging Face cache; else the *proxy* backbone, a small CLIP pre-trained here on
other animal-mnist images (built once, 5-15 min, then cached), a stand-in that says so loudly.

State lives in ``.dpal/demo`` (Label Studio data, model versions), so a second ``make demo``
continues where the first stopped; ``--fresh`` starts over.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "e2e"))

import httpx  # noqa: E402
from labelstudio import (  # noqa: E402
    LABEL_CONFIG_DIR,
    LabelStudioAPI,
    LabelStudioError,
    LabelStudioServer,
    free_port,
    port_in_use,
)
from processes import Service  # noqa: E402
from processes import spawn as start_process  # noqa: E402

PROJECT_TITLE = "DPAL demo (animal-mnist)"
REAL_CLIP = "openai/clip-vit-base-patch16"
USERNAME = "demo@example.com"
BACKEND_TITLE = "DPAL"
# Lines of the backend/worker logs worth showing in the terminal (the rest stays in the log files).
INTERESTING = re.compile(
    r"stage (fetch|train|evaluate|rescore|push|done|refused)|published version|new version refused|"
    r"model_version switched|re-scored|pushed \d+|enqueued training job|follow-up|retry|"
    r"backbone .* loaded|could not|ERROR|failed|^[A-Za-z_.]+(Error|Exception): "
)


def say(msg: str = "") -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- processes


def spawn(name: str, cmd: list[str], env: dict[str, str], log_dir: Path) -> Service:
    return start_process(name, cmd, env, log_dir, REPO)


def tail(service: Service, n: int = 40) -> str:
    return "\n".join(f"  {line}" for line in service.tail(n))


def wait_until(what: str, check, timeout: float, services: list[Service]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for s in services:
            if not s.alive():
                raise RuntimeError(f"{s.name} exited ({s.proc.returncode}) while {what}:\n{tail(s)}")
        with contextlib.suppress(httpx.TransportError, ConnectionError, OSError):
            value = check()
            if value:
                return value
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s while {what}")


def pick_port(preferred: int) -> int:
    return preferred if not port_in_use(preferred) else free_port()


# --------------------------------------------------------------------------- backbone


def choose_backbone(cache: Path) -> tuple[str, str]:
    """(DPAL_MODEL value, a sentence saying what it is)."""
    if os.environ.get("DPAL_MODEL"):
        return os.environ["DPAL_MODEL"], "from DPAL_MODEL"
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(REAL_CLIP, "config.json"), str):
            return REAL_CLIP, "the real CLIP, found in the Hugging Face cache"
    except Exception:  # noqa: BLE001 - no cache, no hub: fall through to the stand-in
        pass
    try:
        from dpal_core.bench.proxy import INFO_FILE, ProxyConfig, build_proxy, default_cache_dir, proxy_key

        cached = (default_cache_dir() / proxy_key(ProxyConfig(), 0) / INFO_FILE).is_file()
        if not cached:
            say("Building the proxy backbone once (5-15 min on 2 cores; cached in ~/.cache/dpal/proxy) ...")
        path = build_proxy(progress=True)
        return str(path), (
            "STAND-IN: the proxy backbone, a small CLIP pre-trained on this machine on 5,000 other "
            "animal-mnist images; no real CLIP is available offline. Scores are real model outputs, "
            f"but of a toy model. Set DPAL_MODEL={REAL_CLIP} (downloads ~600 MB) for the real one."
        )
    except Exception as exc:  # noqa: BLE001 - the demo must still start
        from dpal_core.tiny import build_tiny_clip

        path, _ = build_tiny_clip(cache / "tiny-clip")
        return str(path), (
            f"STAND-IN: a tiny RANDOM CLIP (the proxy backbone is unavailable: {exc}). Predictions and "
            f"scores mean nothing; set DPAL_MODEL to a CLIP folder or id for real ones."
        )


# --------------------------------------------------------------------------- images


def write_images(folder: Path, n: int, shift: str, seed: int = 0) -> list[Path]:
    """``n`` animal-mnist images (class-balanced, from the benchmark pool: never seen by the proxy)."""
    import numpy as np
    from PIL import Image

    from dpal_core.bench.data import load_animal_mnist, split_animal_mnist

    data = load_animal_mnist()
    pool = split_animal_mnist(seed, data.labels)["pool"]
    rng = np.random.default_rng(seed)
    per_class = -(-n // len(data.class_names))
    chosen = np.concatenate(
        [
            rng.choice(pool[data.labels[pool] == c], per_class, replace=False)
            for c in range(len(data.class_names))
        ]
    )
    chosen = rng.permutation(chosen)[:n]
    images = data.images[chosen]
    if shift != "none":
        from dpal_core.bench.shifts import apply_shift

        images = apply_shift(images, shift, (seed, 3))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for img, idx in zip(images, chosen, strict=True):
        path = folder / f"animal_{int(idx):05d}.png"
        Image.fromarray(img).save(path)
        paths.append(path)
    (folder / "labels.json").write_text(
        json.dumps(
            {p.name: data.class_names[int(data.labels[i])] for p, i in zip(paths, chosen, strict=True)}
        )
    )
    return paths


# --------------------------------------------------------------------------- Label Studio project


def find_project(api: LabelStudioAPI) -> dict[str, Any] | None:
    body = api.request("GET", "/api/projects", params={"page_size": 1000})
    items = body.get("results", body) if isinstance(body, dict) else body
    return next((p for p in items if p.get("title") == PROJECT_TITLE), None)


def connect_backend(api: LabelStudioAPI, pid: int, url: str) -> dict[str, Any]:
    """Connect the backend at ``url``; a backend saved with another URL is removed first.

    Label Studio creates the ``<url>/webhook`` webhook only when a backend is *added*; editing the
    URL leaves the webhook on the old one, so annotations would never reach the new backend.
    """
    for ml in api.ml_backends(pid):
        if ml["url"].rstrip("/") == url:
            return api.request("GET", f"/api/ml/{ml['id']}")
        api.request("DELETE", f"/api/ml/{ml['id']}")
    for hook in api.request("GET", "/api/webhooks", params={"project": pid}):
        if hook["url"].rstrip("/").endswith("/webhook") and hook["url"].rstrip("/") != f"{url}/webhook":
            api.request("DELETE", f"/api/webhooks/{hook['id']}")
    return api.connect_ml_backend(pid, url, title=BACKEND_TITLE)


def tasks_by_score(api: LabelStudioAPI, pid: int) -> list[dict[str, Any]]:
    """What the Data Manager shows sorted by Prediction score ascending."""
    query = json.dumps({"ordering": ["tasks:predictions_score"]})
    return api.request(
        "GET", "/api/tasks", params={"project": pid, "fields": "all", "page_size": 1000, "query": query}
    )["tasks"]


def set_up_project(
    api: LabelStudioAPI, ls: LabelStudioServer, backend_url: str, n_images: int, shift: str
) -> int:
    project = find_project(api)
    if project is None:
        project = api.create_project(PROJECT_TITLE, LABEL_CONFIG_DIR / "animal_mnist.xml")
        say(f"created project {project['id']} {PROJECT_TITLE!r}")
    pid = project["id"]
    if not api.list_tasks(pid):
        t = time.monotonic()
        files = write_images(ls.document_root / "animal-mnist", n_images, shift)
        api.import_local_files(pid, files, ls.document_root)
        say(
            f"imported {len(files)} animal-mnist images as PNG files (local storage) in {time.monotonic() - t:.1f} s"
        )
    ml = connect_backend(api, pid, backend_url)
    say(f"backend connected to the project: {ml['url']} ({ml.get('readable_state', ml.get('state'))})")

    tasks = api.list_tasks(pid)
    t = time.monotonic()
    api.retrieve_predictions(pid, [task["id"] for task in tasks])  # skips tasks already predicted
    tasks = api.list_tasks(pid)
    say(f"predictions retrieved for {len(tasks)} tasks in {time.monotonic() - t:.1f} s")

    # Label Studio selects the backend's *title* as the project's model version when it is
    # connected; the Prediction score column only counts predictions of the selected version, so
    # select the version the backend serves (as Settings -> Model -> Predictions does by hand).
    current = api.get_project(pid).get("model_version") or ""
    served = api.request("GET", f"/api/ml/{ml['id']}").get("model_version") or ""
    versions = {p["model_version"] for task in tasks for p in task.get("predictions", [])}
    if served in versions and current != served:
        api.update_project(pid, model_version=served)
        say(f"project model version set to {served} (was {current!r})")
    return pid


def summarise(api: LabelStudioAPI, pid: int, labels: dict[str, str]) -> None:
    ordered = tasks_by_score(api, pid)
    version = api.get_project(pid).get("model_version")
    scores = []
    for task in ordered:
        preds = [
            p
            for p in task.get("predictions", [])
            if p["model_version"] == version and p.get("score") is not None
        ]
        if preds and not task.get("total_annotations"):
            scores.append((preds[0]["score"], task, preds[0]["result"][0]["value"]["choices"][0]))
    if not scores:
        say("no scored predictions yet")
        return
    values = sorted(s for s, _, _ in scores)
    say(
        f"{len(scores)} unlabelled tasks scored by {version}: score min {values[0]:.2f}, "
        f"median {values[len(values) // 2]:.2f}, max {values[-1]:.2f}"
    )
    say("  the queue starts with (least confident first):")
    for score, task, guess in scores[:5]:
        name = task["data"]["image"].rsplit("/", 1)[-1]
        truth = labels.get(name, "?")
        say(f"    task {task['id']:>4}  score {score:.2f}  model says {guess:<9} (truth: {truth})")


# --------------------------------------------------------------------------- main


class Stop(Exception):
    pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--dir", type=Path, default=REPO / ".dpal" / "demo", help="demo state (default .dpal/demo)"
    )
    parser.add_argument("--fresh", action="store_true", help="delete the demo state and start over")
    parser.add_argument("--images", type=int, default=200, help="images to import (default 200)")
    parser.add_argument("--threshold", type=int, default=10, help="annotations per retrain (default 10)")
    parser.add_argument(
        "--shift", default="noise", help="benchmark shift on the images: noise (default) or none"
    )
    parser.add_argument("--ls-port", type=int, default=8080)
    parser.add_argument("--backend-port", type=int, default=9090)
    parser.add_argument("--no-redis", action="store_true", help="use the embedded queue even if Redis exists")
    args = parser.parse_args(argv)

    def on_signal(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)

    root = args.dir.resolve()
    if args.fresh and root.exists():
        shutil.rmtree(root)
    logs = root / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    password_file = root / "labelstudio" / ".dpal-demo-password"
    password_file.parent.mkdir(parents=True, exist_ok=True)
    if not password_file.exists():
        password_file.write_text(secrets.token_urlsafe(9))
        password_file.chmod(0o600)
    password = password_file.read_text().strip()

    services: list[Service] = []
    ls: LabelStudioServer | None = None
    try:
        model, about = choose_backbone(root / "cache")
        say(f"backbone: {model}\n  {about}")

        # Redis (optional)
        redis_url = None
        if not args.no_redis and shutil.which("redis-server"):
            rport = free_port()
            (root / "redis").mkdir(exist_ok=True)
            redis = spawn(
                "redis",
                ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--dir", str(root / "redis")],
                dict(os.environ),
                logs,
            )  # fmt: skip
            services.append(redis)
            redis_url = f"redis://127.0.0.1:{rport}/0"
            from redis import Redis

            wait_until("starting Redis", lambda: Redis.from_url(redis_url).ping(), 30, [redis])
            say(f"redis-server on 127.0.0.1:{rport}: retraining runs in a separate `dpal worker`")
        else:
            say("no redis-server: retraining runs on the backend's embedded queue (inside `dpal serve`)")

        # Label Studio
        say("starting Label Studio (own venv, ~10 s; the first start of a new data dir ~40 s) ...")
        ls = LabelStudioServer(
            port=pick_port(args.ls_port),
            data_dir=root / "labelstudio",
            username=USERNAME,
            password=password,
            extra_env={"ML_TIMEOUT_PREDICT": "600"},  # 200 images on a CPU-only real CLIP take a while
        )
        ls.start()
        say(f"Label Studio up at {ls.url} in {ls.startup_seconds:.1f} s")

        # backend and worker
        bport = pick_port(args.backend_port)
        backend_url = f"http://127.0.0.1:{bport}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "BASIC_AUTH_"))}
        env.pop("REDIS_URL", None)
        env.update(
            {
                "DPAL_MODEL": model,
                "MODEL_DIR": str(root / "models"),
                "LABEL_STUDIO_URL": ls.url,
                "LABEL_STUDIO_API_KEY": ls.token,
                "LOCAL_FILES_DOCUMENT_ROOT": str(ls.document_root),
                "DPAL_TRAIN_THRESHOLD": str(args.threshold),
                "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "1"),
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
            }
        )
        if model == REAL_CLIP:
            env.setdefault("HF_HUB_OFFLINE", "1")  # it is in the cache: no network at start
        if redis_url:
            env["REDIS_URL"] = redis_url
        cli = [sys.executable, "-m", "backend.cli"]
        backend = spawn("backend", [*cli, "serve", "--host", "127.0.0.1", "--port", str(bport)], env, logs)
        services.append(backend)
        worker = None
        if redis_url:
            worker = spawn("worker", [*cli, "worker"], env, logs)
            services.append(worker)
        with httpx.Client(base_url=backend_url, timeout=5) as http:
            health = wait_until(
                "loading the backbone in the backend",
                lambda: (h := http.get("/health").json())["backbone"] != "loading" and h,
                600,
                services,
            )
        if health["backbone"] != "ready":
            raise RuntimeError(f"the backend could not load the backbone:\n{tail(backend)}")
        say(f"DPAL backend up at {backend_url}")
        if worker is not None:
            from redis import Redis
            from rq import Worker

            wait_until(
                "starting the worker", lambda: Worker.all(connection=Redis.from_url(redis_url)), 600, services
            )
            say("dpal worker listening on the Redis queue 'dpal'")

        # project, images, predictions
        with ls.api(timeout=900) as api:
            pid = set_up_project(api, ls, backend_url, args.images, args.shift)
            labels_file = ls.document_root / "animal-mnist" / "labels.json"
            labels = json.loads(labels_file.read_text()) if labels_file.exists() else {}
            summarise(api, pid, labels)

        say(
            f"""
================================================================================
 Label Studio:  {ls.url}/projects/{pid}/data
 Log in with:   {USERNAME}  /  {password}
 API token:     {ls.token}
 Backbone:      {model}
                {about}

 What to do:
  1. In the Data Manager click the "Prediction score" column header until it
     sorts ascending (or Order by -> Prediction score): least confident first.
  2. Click "Label Tasks As Displayed" and label {args.threshold} images
     (the true animal is in {labels_file} if you need it).
  3. After {args.threshold} annotations a retrain runs: watch this terminal.
     It publishes a new model version, re-scores every unlabelled image and
     switches the project to it. Reload the Data Manager: new scores, new order.
 Model versions and their figures: {backend_url}/versions/{pid}
 Logs: {logs}
 Stop everything with Ctrl-C.
================================================================================""",
        )
        follow(
            api_url=ls.url, token=ls.token, pid=pid, backend_url=backend_url, services=services, labels=labels
        )
        return 0
    except Stop as stop:
        say(f"\n{stop}: stopping ...")
        return 0
    except (RuntimeError, LabelStudioError) as exc:
        say(f"\ndemo failed: {exc}")
        if ls is not None:
            say(ls.log_tail(20))
        for s in services:
            say(f"--- {s.name} log ({s.log_path}):\n{tail(s, 20)}")
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for s in reversed(services):
            if s.name != "redis":
                s.stop()
        if ls is not None:
            ls.stop()
        for s in services:
            if s.name == "redis":
                s.stop()
        say("stopped: " + ", ".join(["Label Studio"] * (ls is not None) + [s.name for s in services]))


def follow(
    api_url: str, token: str, pid: int, backend_url: str, services: list[Service], labels: dict
) -> None:
    """Show retraining progress until a signal arrives (raises Stop) or a service dies."""
    last: dict[str, Any] = {}

    def show_logs() -> None:
        for s in services:
            if not s.alive():
                raise RuntimeError(f"{s.name} stopped unexpectedly (exit {s.proc.returncode})")
            if s.name in ("backend", "worker"):
                for line in s.new_lines():
                    if INTERESTING.search(line):
                        say(f"[{s.name}] {line}")

    with (
        httpx.Client(base_url=backend_url, timeout=10) as http,
        LabelStudioAPI(api_url, token, timeout=120) as api,
    ):
        while True:
            show_logs()
            try:
                status = http.get(f"/versions/{pid}").json()
            except (httpx.TransportError, ValueError):
                time.sleep(2)
                continue
            training = status.get("training") or {}
            pending, threshold = training.get("pending", 0), training.get("threshold")
            if pending != last.get("pending"):
                if pending:
                    say(f"annotations since the last retrain: {pending}/{threshold}")
                last["pending"] = pending
            for key in ("queued", "running"):
                job = training.get(key)
                if job and job != last.get(key):
                    say(f"retrain job {job} {key}")
                last[key] = job
            current = status.get("current")
            if "current" in last and current != last["current"]:
                info = next((v for v in status.get("versions", []) if v["version"] == current), {})
                m = info.get("metrics", {})
                say(
                    f"\n*** version {current} published: {info.get('model_version')} "
                    f"(trained on {m.get('n_train')} annotations, held-out accuracy {m.get('accuracy')}, "
                    f"zero-shot on the same items {m.get('zero_shot_accuracy')})"
                )
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline and api.get_project(pid).get("model_version") != info.get(
                    "model_version"
                ):
                    time.sleep(1)
                show_logs()
                summarise(api, pid, labels)
                say("*** reload the Data Manager in the browser to see the new order\n")
            last["current"] = current
            time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
