"""A real Label Studio for end-to-end tests: install, start, drive over REST, stop.

Label Studio pins an older ``label-studio-sdk`` than the project, so it lives in
its **own** virtual environment, cached between runs (``~/.cache/dpal/
labelstudio-venv``, ~1 GB, 90-160 s to install on 2 cores). Migrating a new
data dir takes another 40-90 s, so a migrated, user-less database is built
once and kept in the venv; fresh data dirs start from a copy in ~6 s. The
server is started as ``label-studio start`` in a new process group and
stopped by that group.

Usage::

    venv = ensure_label_studio()
    with LabelStudioServer(data_dir=tmp_path / "ls", venv=venv) as ls:
        api = ls.api()
        project = api.create_project("demo", LABEL_CONFIG_DIR / "animal_mnist.xml")
        ids = api.import_local_files(project["id"], pngs, ls.document_root)

Environment overrides: ``DPAL_LABELSTUDIO_VENV`` (venv location),
``DPAL_LABELSTUDIO_VERSION`` (pip version pin).

Pitfalls this module handles (seen on Label Studio 1.23.2):

* ``label-studio --version`` starts a server; the installed version is read
  with ``importlib.metadata`` from the venv's Python instead.
* A busy port is not an error for Label Studio: it silently moves to the next
  free one. The harness picks a free port, checks it again right before the
  start and fails on the "Port ... is in use" warning.
* The user and its token are created on the first start of a data dir only;
  restarting the same data dir with another token leaves the old one. The
  readiness check makes an authenticated call and says so on 401.
* ``/data/local-files/?d=...`` is served only under a *local files storage*
  registered for the project (``/api/storages/localfiles``) whose path
  contains the file; without one Label Studio answers 404.
* An ML backend on 127.0.0.1 is refused (403) unless both
  ``ML_BLOCK_LOCAL_IP=false`` and ``SSRF_PROTECTION_ENABLED=false``.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

log = logging.getLogger(__name__)

LABEL_STUDIO_VERSION = os.environ.get("DPAL_LABELSTUDIO_VERSION", "1.23.2")
DEFAULT_VENV = Path(
    os.environ.get("DPAL_LABELSTUDIO_VENV", Path.home() / ".cache" / "dpal" / "labelstudio-venv")
).expanduser()
REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_CONFIG_DIR = REPO_ROOT / "label_config"

# Variables from the caller's environment that would change how Label Studio
# starts (another data dir, settings module, venv); the server gets its own.
_SCRUBBED_PREFIXES = ("LABEL_STUDIO_", "HEARTEX_", "DJANGO_", "POSTGRE_")
_SCRUBBED_NAMES = {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "PORT", "LOCAL_FILES_DOCUMENT_ROOT"}


class LabelStudioError(RuntimeError):
    """Label Studio could not be installed, started or driven; the message says why."""


# --------------------------------------------------------------------------- install


def _stamp(venv: Path, version: str) -> Path:
    return venv / f".dpal-label-studio-{version}"


def ensure_label_studio(
    venv: Path | None = None, version: str = LABEL_STUDIO_VERSION, timeout: float = 900
) -> Path:
    """Install ``label-studio==version`` into its own venv unless already there.

    A stamp file written after a successful install marks a usable venv; a venv
    without it (an interrupted install) is removed and rebuilt. A file lock
    keeps two test processes from installing at once.

    Args:
        venv: venv folder; default ``DEFAULT_VENV``.
        version: exact Label Studio version.
        timeout: seconds allowed for ``pip install``.

    Returns:
        The venv folder; its ``bin/label-studio`` is the server.
    """
    venv = Path(venv or DEFAULT_VENV)
    venv.parent.mkdir(parents=True, exist_ok=True)
    lock_path = venv.parent / f".{venv.name}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _stamp(venv, version).exists() and (venv / "bin" / "label-studio").exists():
            return venv
        if venv.exists():
            log.warning("removing incomplete or outdated Label Studio venv %s", venv)
            shutil.rmtree(venv)
        started = time.monotonic()
        log.info("installing label-studio==%s into %s (~90 s, ~1 GB)", version, venv)
        # The base interpreter, not the project venv's, so nothing of the project leaks in.
        python = getattr(sys, "_base_executable", sys.executable)
        _run([python, "-m", "venv", str(venv)], timeout=120)
        _run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                f"label-studio=={version}",
            ],
            timeout=timeout,
        )
        installed = _run(
            [
                str(venv / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('label-studio'))",
            ],
            timeout=60,
        ).strip()
        if installed != version:
            raise LabelStudioError(f"expected label-studio {version} in {venv}, found {installed}")
        _stamp(venv, version).touch()
        log.info("label-studio %s installed in %.0f s", version, time.monotonic() - started)
        return venv


def _run(cmd: list[str], timeout: float) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise LabelStudioError(f"{cmd[:4]} timed out after {timeout:.0f} s") from exc
    if done.returncode != 0:
        tail = (done.stdout + done.stderr)[-4000:]
        raise LabelStudioError(f"{' '.join(cmd[:6])} failed with exit {done.returncode}:\n{tail}")
    return done.stdout


def migrated_database(venv: Path, timeout: float = 600) -> Path | None:
    """A migrated, user-less Label Studio database kept in the venv, built once.

    Migrating a new data dir takes 40-90 s on 2 cores; copying this template
    into a fresh data dir brings its first start down to a few seconds. Built
    with ``label-studio user``, which migrates and exits without serving.

    Returns:
        The template ``label_studio.sqlite3``, or None if it could not be built
        (the caller then lets Label Studio migrate as usual).
    """
    template = venv / ".dpal-db-template" / "label_studio.sqlite3"
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if template.exists():
            return template
        work = template.parent.with_name(".dpal-db-template.partial")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        env = _clean_env()
        env.update(_QUIET_ENV)
        env.update(
            {
                "LABEL_STUDIO_BASE_DATA_DIR": str(work),
                "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
            }
        )
        started = time.monotonic()
        try:
            subprocess.run(
                [str(venv / "bin" / "label-studio"), "user"],
                env=env,
                cwd=work,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=timeout,
                check=True,
            )
        except (subprocess.SubprocessError, OSError) as exc:
            log.warning("could not build a migrated database template (%s); fresh starts will migrate", exc)
            return None
        if not (work / "label_studio.sqlite3").exists():
            return None
        # Only the database: the data dir's .env holds a per-dir SECRET_KEY.
        template.parent.mkdir(exist_ok=True)
        os.replace(work / "label_studio.sqlite3", template)
        shutil.rmtree(work, ignore_errors=True)
        log.info("migrated database template built in %.0f s", time.monotonic() - started)
        return template


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED_NAMES
    }


# No calls home from a test machine (PyPI version check, telemetry, Sentry).
_QUIET_ENV = {
    "LATEST_VERSION_CHECK": "false",
    "COLLECT_ANALYTICS": "false",
    "SENTRY_DSN": "",
    "FRONTEND_SENTRY_DSN": "",
    "PYTHONUNBUFFERED": "1",
}


# --------------------------------------------------------------------------- server


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class LabelStudioServer:
    """One Label Studio process on 127.0.0.1, as a context manager.

    Args:
        port: TCP port; default a free one.
        data_dir: ``LABEL_STUDIO_BASE_DATA_DIR`` (database, uploads, ``server.log``).
        username: e-mail of the admin user created on the first start.
        password: its password.
        token: legacy API token, 40 hex characters; default a random one, kept in
            ``data_dir/.dpal-token`` and reused when the same data dir starts again.
        document_root: ``LOCAL_FILES_DOCUMENT_ROOT``; default ``data_dir/files``.
        venv: Label Studio's venv; default installs it with ``ensure_label_studio``.
        startup_timeout: seconds to wait for readiness (first start migrates, ~40 s).
        extra_env: more environment for the server (e.g. ``ML_TIMEOUT_PREDICT``).
        use_template_db: seed a new data dir with a migrated database
            (``migrated_database``) instead of migrating at start.
    """

    def __init__(
        self,
        port: int | None = None,
        data_dir: Path | str = "labelstudio-data",
        username: str = "dpal@example.com",
        password: str = "dpal-e2e-password",
        token: str | None = None,
        document_root: Path | str | None = None,
        venv: Path | None = None,
        startup_timeout: float = 240,
        extra_env: dict[str, str] | None = None,
        use_template_db: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.data_dir = Path(data_dir).resolve()
        self.username = username
        self.password = password
        self.token = token or self._remembered_token()
        if len(self.token) != 40 or any(c not in "0123456789abcdef" for c in self.token):
            raise ValueError("token must be 40 lowercase hex characters (secrets.token_hex(20))")
        self.document_root = Path(document_root or self.data_dir / "files").resolve()
        self.venv = venv
        self.startup_timeout = startup_timeout
        self.extra_env = dict(extra_env or {})
        self.use_template_db = use_template_db
        self.log_path = self.data_dir / "server.log"
        self.url = f"http://127.0.0.1:{self.port}"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def _remembered_token(self) -> str:
        # A data dir keeps the token of its first start, so a default token is
        # kept beside the data and reused on the next start of the same dir.
        path = self.data_dir / ".dpal-token"
        if path.exists():
            return path.read_text().strip()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        token = secrets.token_hex(20)
        path.write_text(token)
        return token

    # -- lifecycle

    def environment(self) -> dict[str, str]:
        """The server's environment: the caller's, scrubbed, plus Label Studio settings."""
        env = _clean_env()
        venv_bin = str(Path(self.venv or DEFAULT_VENV) / "bin")
        env.update(
            {
                "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
                "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
                "LABEL_STUDIO_USERNAME": self.username,
                "LABEL_STUDIO_PASSWORD": self.password,
                "LABEL_STUDIO_USER_TOKEN": self.token,
                "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
                "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
                "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(self.document_root),
                # An ML backend on loopback is refused (403) unless both are off.
                "ML_BLOCK_LOCAL_IP": "false",
                "SSRF_PROTECTION_ENABLED": "false",
                **_QUIET_ENV,
            }
        )
        env.update(self.extra_env)
        return env

    def start(self) -> LabelStudioServer:
        """Start the server and wait until it answers authenticated API calls."""
        if self._proc is not None:
            raise LabelStudioError("server already started")
        self.venv = ensure_label_studio(self.venv)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.document_root.mkdir(parents=True, exist_ok=True)
        database = self.data_dir / "label_studio.sqlite3"
        if self.use_template_db and not database.exists():
            template = migrated_database(self.venv)
            if template is not None:
                shutil.copyfile(template, database)
        if port_in_use(self.port):
            raise LabelStudioError(f"port {self.port} is in use; Label Studio would silently move")
        cmd = [
            str(self.venv / "bin" / "label-studio"),
            "start",
            "--no-browser",
            "--internal-host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--enable-legacy-api-token",
        ]
        started = time.monotonic()
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                cmd,
                cwd=self.data_dir,
                env=self.environment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: stop() kills it whole
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        log.info("Label Studio up at %s in %.1f s", self.url, self.startup_seconds)
        return self

    def _wait_ready(self) -> None:
        proc = self._proc
        if proc is None:
            raise LabelStudioError("server not started")
        deadline = time.monotonic() + self.startup_timeout
        last = "no answer yet"
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise LabelStudioError(
                        f"Label Studio exited with {proc.returncode} while starting\n{self.log_tail()}"
                    )
                if "is in use" in self._read_log():
                    raise LabelStudioError(
                        f"port {self.port} was taken; Label Studio moved\n{self.log_tail()}"
                    )
                try:
                    health = http.get("/health")
                    if health.status_code == 200:
                        me = http.get("/api/current-user/whoami", headers=self.auth_headers)
                        if me.status_code == 200:
                            return
                        if me.status_code in (401, 403):
                            raise LabelStudioError(
                                f"Label Studio is up but rejects the token ({me.status_code}); a data dir "
                                "keeps the token of its first start: reuse it or use a fresh data_dir"
                            )
                        last = f"whoami -> {me.status_code}"
                    else:
                        last = f"/health -> {health.status_code}"
                except httpx.TransportError as exc:
                    last = type(exc).__name__
                time.sleep(0.5)
        raise LabelStudioError(
            f"Label Studio not ready after {self.startup_timeout:.0f} s ({last})\n{self.log_tail()}"
        )

    def stop(self, timeout: float = 20) -> None:
        """Stop the process group: SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        # runserver may leave children in the group after the leader exits.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> LabelStudioServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- logs and clients

    def _read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 60) -> str:
        """Last lines of ``server.log``, for failure messages."""
        tail = self._read_log().splitlines()[-lines:]
        return f"--- last {len(tail)} lines of {self.log_path}\n" + "\n".join(tail)

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Token {self.token}"}

    def api(self, timeout: float = 60) -> LabelStudioAPI:
        """A small REST client for this server (httpx, legacy token)."""
        return LabelStudioAPI(self.url, self.token, timeout=timeout)

    def sdk(self) -> Any:
        """The project's ``label_studio_sdk.LabelStudio`` client for this server."""
        from label_studio_sdk import LabelStudio

        return LabelStudio(base_url=self.url, api_key=self.token)


# --------------------------------------------------------------------------- REST helpers


def local_files_url(path: Path, document_root: Path) -> str:
    """The task URL Label Studio serves ``path`` under (``/data/local-files/?d=...``)."""
    rel = Path(path).resolve().relative_to(Path(document_root).resolve())
    return f"/data/local-files/?d={quote(rel.as_posix())}"


class LabelStudioAPI:
    """The few REST calls the end-to-end tests need, with errors that show the body."""

    def __init__(self, url: str, token: str, timeout: float = 60) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Token {token}"}, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LabelStudioAPI:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        r = self.http.request(method, path, **kwargs)
        if r.status_code >= 400:
            raise LabelStudioError(f"{method} {path} -> {r.status_code}: {r.text[:2000]}")
        return r.json() if r.content else None

    # projects

    def create_project(self, title: str, label_config: str | Path, **fields: Any) -> dict[str, Any]:
        """Create a project; ``label_config`` is XML text or a path to an XML file."""
        if isinstance(label_config, Path) or not str(label_config).lstrip().startswith("<"):
            label_config = Path(label_config).read_text(encoding="utf-8")
        return self.request(
            "POST", "/api/projects", json={"title": title, "label_config": label_config, **fields}
        )

    def get_project(self, project_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/projects/{project_id}")

    def update_project(self, project_id: int, **fields: Any) -> dict[str, Any]:
        return self.request("PATCH", f"/api/projects/{project_id}", json=fields)

    # tasks and local files

    def add_local_storage(self, project_id: int, path: Path, title: str = "local files") -> dict[str, Any]:
        """Register a local files storage so Label Studio serves files under ``path``.

        ``path`` must be an existing folder inside the server's document root.
        The storage is not synced: tasks are imported explicitly.
        """
        body = {
            "project": project_id,
            "path": str(Path(path).resolve()),
            "title": title,
            "use_blob_urls": True,
        }
        return self.request("POST", "/api/storages/localfiles", json=body)

    def import_tasks(self, project_id: int, tasks: list[dict[str, Any]]) -> list[int]:
        """Import tasks (``[{"data": {...}}, ...]``); returns the new task ids in order."""
        body = self.request(
            "POST", f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=tasks
        )
        if len(body.get("task_ids", [])) != len(tasks):
            raise LabelStudioError(f"imported {len(tasks)} tasks, Label Studio answered {body}")
        return list(body["task_ids"])

    def import_local_files(
        self,
        project_id: int,
        files: Iterable[Path],
        document_root: Path,
        data_key: str = "image",
        register_storage: bool = True,
    ) -> list[int]:
        """Import one task per file as ``{data_key: "/data/local-files/?d=<rel>"}``.

        Files must lie under ``document_root``. With ``register_storage`` a local
        files storage is added for each distinct folder (needed for serving).
        """
        files = [Path(f).resolve() for f in files]
        if register_storage:
            known = {
                s["path"]
                for s in self.request("GET", "/api/storages/localfiles", params={"project": project_id})
            }
            for folder in sorted({f.parent for f in files}):
                if str(folder) not in known:
                    self.add_local_storage(project_id, folder)
        tasks = [{"data": {data_key: local_files_url(f, document_root)}} for f in files]
        return self.import_tasks(project_id, tasks)

    def list_tasks(self, project_id: int, page_size: int = 1000) -> list[dict[str, Any]]:
        """All tasks of a project with their predictions and annotations."""
        tasks: list[dict[str, Any]] = []
        page = 1
        while True:
            body = self.request(
                "GET",
                "/api/tasks",
                params={"project": project_id, "fields": "all", "page": page, "page_size": page_size},
            )
            tasks.extend(body["tasks"])
            if len(tasks) >= body.get("total", len(tasks)) or not body["tasks"]:
                return tasks
            page += 1

    def get_task(self, task_id: int) -> dict[str, Any]:
        return self.request("GET", f"/api/tasks/{task_id}")

    def predictions(self, task_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/predictions", params={"task": task_id})

    def fetch(self, url: str) -> bytes:
        """GET a Label Studio URL (e.g. a task's ``/data/local-files/?d=...``) with the token."""
        r = self.http.get(url)
        if r.status_code != 200:
            raise LabelStudioError(f"GET {url} -> {r.status_code}: {r.text[:500]}")
        return r.content

    # annotations and ML backends

    def submit_annotation(
        self, task_id: int, from_name: str, to_name: str, choice: str, lead_time: float = 1.0
    ) -> dict[str, Any]:
        """Annotate a task with one choice, as the labeling UI's Submit does."""
        result = [
            {"from_name": from_name, "to_name": to_name, "type": "choices", "value": {"choices": [choice]}}
        ]
        body = {"result": result, "lead_time": lead_time, "was_cancelled": False, "ground_truth": False}
        return self.request("POST", f"/api/tasks/{task_id}/annotations", json=body)

    def connect_ml_backend(
        self, project_id: int, url: str, title: str = "DPAL", **fields: Any
    ) -> dict[str, Any]:
        """Connect an ML backend (Label Studio calls its /health and /setup now)."""
        body = {"project": project_id, "url": url, "title": title, **fields}
        return self.request("POST", "/api/ml", json=body)

    def ml_backends(self, project_id: int) -> list[dict[str, Any]]:
        return self.request("GET", "/api/ml", params={"project": project_id})

    def train(self, ml_backend_id: int) -> Any:
        """The Model tab's "Start training" (sends START_TRAINING to the backend)."""
        return self.request("POST", f"/api/ml/{ml_backend_id}/train", json={})

    def retrieve_predictions(self, project_id: int, task_ids: list[int]) -> Any:
        """Data Manager action "Retrieve predictions" for the given tasks."""
        return self.request(
            "POST",
            "/api/dm/actions",
            params={"id": "retrieve_tasks_predictions", "project": project_id},
            json={"selectedItems": {"all": False, "included": task_ids}},
        )


@contextlib.contextmanager
def running_label_studio(data_dir: Path, **kwargs: Any) -> Iterator[LabelStudioServer]:
    """``with running_label_studio(tmp) as ls:`` — start, yield, always stop."""
    server = LabelStudioServer(data_dir=data_dir, **kwargs)
    server.start()
    try:
        yield server
    finally:
        server.stop()


if __name__ == "__main__":  # manual check: python tests/e2e/labelstudio.py [DATA_DIR]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/dpal-ls-manual")
    with running_label_studio(target) as srv:
        print(json.dumps({"url": srv.url, "token": srv.token, "startup_s": srv.startup_seconds}))
        print("press Ctrl-C to stop")
        with contextlib.suppress(KeyboardInterrupt):
            while srv.running:
                time.sleep(1)
