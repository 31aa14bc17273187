"""The Docker deployment files are valid and complete, checked without a Docker engine.

* ``docker/docker-compose.yml`` validates against the Compose Specification JSON
  schema, vendored as ``tests/data/compose-spec.json`` (from the PyPI package
  check-jsonschema 0.39.0, ``builtin_schemas/vendor/compose-spec.json``, sha256
  d549057e...0e64; Apache-2.0, ``tests/data/compose-spec.LICENSE``). Needs only
  PyYAML and jsonschema, both already dependencies of the project's dependencies.
* Compose's interpolation, references between services and volumes, pinned
  images, healthchecks and the settings of ``docs/settings.md`` are checked here.
* ``docker/Dockerfile`` and ``.dockerignore`` are checked as text.

By hand, Debian's ``docker-compose`` 1.29 (``apt-get install docker-compose``)
also accepts the file without an engine: ``docker-compose -f
docker/docker-compose.yml config -q`` with the two required variables set.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "docker-compose.yml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
SCHEMA = Path(__file__).resolve().parent / "data" / "compose-spec.json"
SCHEMA_SHA256 = "d549057ebc2925f39f62799eab0db7b9e2c18b35b6c00595199116da3ed10e64"
SETTINGS_DOC = ROOT / "docs" / "settings.md"
SETTINGS_PY = ROOT / "backend" / "settings.py"

REQUIRED_VARS = {"LABEL_STUDIO_USER_TOKEN", "LABEL_STUDIO_PASSWORD"}
EXAMPLE_ENV = {"LABEL_STUDIO_USER_TOKEN": "0123456789abcdef" * 2 + "01234567", "LABEL_STUDIO_PASSWORD": "pw"}
DPAL_SERVICES = ("dpal-backend", "dpal-worker", "dpal-worker-cpu")

# Compose interpolation: $$, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, $VAR.
_INTERP = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class MissingVariable(LookupError):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution over a parsed file (strings only, recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name = m.group(2) or m.group(5)
        op, arg = m.group(3), m.group(4) or ""
        current = env.get(name)
        unset = current is None or (op is not None and op.startswith(":") and current == "")
        if op in (":-", "-"):
            return arg if unset else current
        if op in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {arg}")
            return current
        return current or ""

    return _INTERP.sub(sub, value)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose(raw: dict[str, Any]) -> dict[str, Any]:
    return interpolate(raw, dict(EXAMPLE_ENV))


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, None) for item in env)
    return {k: ("" if v is None else str(v)) for k, v in env.items()}


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """target path -> source (volume name or host path) of a service's volumes."""
    out = {}
    for vol in service.get("volumes", []):
        if isinstance(vol, str):
            parts = vol.split(":")
            out[parts[1]] = parts[0]
        else:
            out[vol["target"]] = vol.get("source", "")
    return out


# --------------------------------------------------------------------------- compose: schema and syntax


def test_vendored_schema_is_intact() -> None:
    assert hashlib.sha256(SCHEMA.read_bytes()).hexdigest() == SCHEMA_SHA256


def test_compose_matches_the_compose_specification(raw: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator_cls = jsonschema.validators.validator_for(schema)
    validator_cls.check_schema(schema)
    errors = sorted(validator_cls(schema).iter_errors(raw), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


def test_schema_check_catches_mistakes(raw: dict[str, Any]) -> None:
    # Guard against a schema that accepts anything.
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    broken = json.loads(json.dumps(raw))
    broken["services"]["redis"]["restart"] = ["always"]
    broken["services"]["redis"]["helthcheck"] = {}
    assert len(list(jsonschema.validators.validator_for(schema)(schema).iter_errors(broken))) >= 2


def test_only_the_secrets_are_required(raw: dict[str, Any]) -> None:
    for name in REQUIRED_VARS:
        env = {k: v for k, v in EXAMPLE_ENV.items() if k != name}
        with pytest.raises(MissingVariable, match=name):
            interpolate(raw, env)
    interpolate(raw, dict(EXAMPLE_ENV))  # nothing else needed


def test_interpolated_file_still_matches_the_specification(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.validators.validator_for(schema)(schema).validate(compose)


# --------------------------------------------------------------------------- compose: services


def test_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"label-studio", "redis", "dpal-backend", "dpal-worker"} <= set(services)
    assert services["dpal-backend"]["command"] == ["dpal", "serve", "--host", "0.0.0.0", "--port", "9090"]
    for name in ("dpal-worker", "dpal-worker-cpu"):
        assert services[name]["command"][:2] == ["dpal", "worker"]
    assert "--burst" not in services["dpal-worker"]["command"]


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        image = service.get("image")
        assert image, f"{name} has no image name"
        repo, _, tag = image.rpartition(":")
        assert repo and tag and tag != "latest" and re.search(r"\d", tag), f"{name}: {image} is not pinned"
    assert re.fullmatch(
        r"heartexlabs/label-studio:\d+\.\d+\.\d+", compose["services"]["label-studio"]["image"]
    )
    assert re.fullmatch(r"redis:7\.\d+(\.\d+)?-alpine", compose["services"]["redis"]["image"])


def test_every_service_has_a_healthcheck_and_restart_policy(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert service.get("restart") in {"always", "unless-stopped", "on-failure"}, name
        check = service.get("healthcheck", {})
        assert check.get("test") and not check.get("disable"), f"{name} has no healthcheck"
    assert compose["services"]["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "/health" in " ".join(compose["services"]["dpal-backend"]["healthcheck"]["test"])
    assert "/health" in " ".join(compose["services"]["label-studio"]["healthcheck"]["test"])


def test_depends_on_waits_for_healthy_services(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in DPAL_SERVICES:
        deps = services[name]["depends_on"]
        assert isinstance(deps, dict), f"{name}: depends_on must use conditions"
        assert "redis" in deps
        for dep, cond in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert cond["condition"] == "service_healthy"
            assert services[dep].get("healthcheck"), f"{dep} must have a healthcheck for {name} to wait on"


def test_worker_reserves_an_nvidia_gpu(compose: dict[str, Any]) -> None:
    worker = compose["services"]["dpal-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia"
    assert "gpu" in device["capabilities"]
    assert _env(worker)["ACCELERATE_MIXED_PRECISION"] == "fp16"
    cpu = compose["services"]["dpal-worker-cpu"]
    assert cpu["profiles"] == ["cpu"], "the CPU worker must not start next to the GPU one by default"
    assert "deploy" not in cpu
    assert _env(cpu)["ACCELERATE_MIXED_PRECISION"] == "no"
    assert _env(cpu)["DPAL_DEVICE"] == "cpu"


def test_model_dir_and_hf_cache_are_shared_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for var in ("MODEL_DIR", "HF_HOME"):
        sources = set()
        for name in DPAL_SERVICES:
            service = compose["services"][name]
            path = _env(service)[var]
            source = _mounts(service).get(path)
            assert source in declared, f"{name}: {var}={path} is not on a named volume"
            sources.add(source)
        assert len(sources) == 1, f"{var} is not one volume shared by backend and worker: {sources}"


def test_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for target, source in _mounts(service).items():
            if not source.startswith((".", "/", "~", "$")):
                assert source in declared, f"{name}: volume {source} (at {target}) is not declared"


# --------------------------------------------------------------------------- compose: settings


def _documented_settings() -> set[str]:
    names = set()
    for line in SETTINGS_DOC.read_text(encoding="utf-8").splitlines():
        if line.startswith("|"):
            first = line.split("|")[1]
            names.update(re.findall(r"`([A-Z][A-Z0-9_]+)`", first))
    return names


def _settings_read_by_code() -> set[str]:
    # Settings.from_env reads every variable through get("NAME") or _parse_x(get, "NAME", ...).
    text = SETTINGS_PY.read_text(encoding="utf-8")
    return set(re.findall(r"""get\(\s*["']([A-Z][A-Z0-9_]+)["']""", text)) | set(
        re.findall(r"""_parse_\w+\(\s*get\s*,\s*["']([A-Z][A-Z0-9_]+)["']""", text)
    )


def test_settings_doc_and_code_agree() -> None:
    documented, read = _documented_settings(), _settings_read_by_code()
    assert len(documented) >= 17
    assert read <= documented, f"read by backend/settings.py but not in docs/settings.md: {read - documented}"
    assert documented <= read, f"in docs/settings.md but not read by backend/settings.py: {documented - read}"


def test_every_setting_is_set_for_backend_and_worker(compose: dict[str, Any]) -> None:
    settings = _documented_settings() | _settings_read_by_code()
    for name in DPAL_SERVICES:
        missing = settings - set(_env(compose["services"][name]))
        assert not missing, f"{name} does not set {sorted(missing)}"
    text = COMPOSE.read_text(encoding="utf-8")
    for var in settings:
        # Each is explained by a comment on or just above its line.
        lines = text.splitlines()
        idx = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{var}:"))
        context = lines[max(0, idx - 3) : idx + 1]
        assert any("#" in line for line in context), f"{var} has no comment in the compose file"


def test_backend_settings_are_valid(compose: dict[str, Any], tmp_path: Path) -> None:
    from backend.settings import Settings

    for name in DPAL_SERVICES:
        env = _env(compose["services"][name])
        # The document root is a mounted folder in the container; stand in for it here.
        env["LOCAL_FILES_DOCUMENT_ROOT"] = str(tmp_path)
        settings = Settings.from_env(env)
        assert settings.redis_url == "redis://redis:6379/0"
        assert settings.label_studio_host == "label-studio"
        assert not settings.basic_auth_enabled


def test_label_studio_reaches_the_backend_and_shares_local_files(compose: dict[str, Any]) -> None:
    ls = _env(compose["services"]["label-studio"])
    assert ls["LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN"] == "true"
    assert ls["LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED"] == "true"
    # A backend on the compose network has a private address: both guards must be off.
    assert ls["ML_BLOCK_LOCAL_IP"] == "false"
    assert ls["SSRF_PROTECTION_ENABLED"] == "false"
    root = ls["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"]
    ls_source = _mounts(compose["services"]["label-studio"])[root]
    for name in DPAL_SERVICES:
        service = compose["services"][name]
        env = _env(service)
        assert env["LOCAL_FILES_DOCUMENT_ROOT"] == root
        assert _mounts(service)[root] == ls_source, f"{name} does not see Label Studio's local files"
        assert env["LABEL_STUDIO_API_KEY"] == ls["LABEL_STUDIO_USER_TOKEN"]
        assert env["LABEL_STUDIO_URL"].startswith("http://label-studio:8080")


# --------------------------------------------------------------------------- Dockerfile and .dockerignore


def _dockerfile_lines() -> list[str]:
    """Instructions with line continuations joined and comments dropped."""
    out, current = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        out.append(current + stripped)
        current = ""
    assert not current, "Dockerfile ends inside a line continuation"
    return out


def test_dockerfile_device_build_arg() -> None:
    lines = _dockerfile_lines()
    first_from = next(i for i, line in enumerate(lines) if line.upper().startswith("FROM "))
    assert "ARG DEVICE=cpu" in lines[:first_from], "ARG DEVICE=cpu must come before the first FROM"
    froms = [line for line in lines if line.upper().startswith("FROM ")]
    assert any("${DEVICE}" in line for line in froms), "no stage is selected by DEVICE"
    stages = {line.split()[-1] for line in froms if " AS " in line.upper()}
    assert {"torch-cpu", "torch-cuda"} <= stages
    text = "\n".join(lines)
    assert "python:3.11-slim" in text
    assert "torch==2.13.*" in text
    assert "https://download.pytorch.org/whl/cpu" in text


def test_dockerfile_installs_the_project_with_pip_cache() -> None:
    lines = _dockerfile_lines()
    runs = [line for line in lines if line.startswith("RUN ")]
    assert any("pip install ." in line for line in runs)
    pip_runs = [line for line in runs if "pip install" in line]
    assert pip_runs and all("--mount=type=cache" in line for line in pip_runs)
    assert "syntax=docker/dockerfile:1" in DOCKERFILE.read_text(encoding="utf-8").splitlines()[0]


def test_dockerfile_runs_as_non_root_with_healthcheck() -> None:
    lines = _dockerfile_lines()
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in {"root", "0", "0:0"}
    # The user is created before it is used.
    assert any("useradd" in line and users[-1] in line for line in lines)
    checks = [line for line in lines if line.startswith("HEALTHCHECK ")]
    assert len(checks) == 1 and "/health" in checks[0] and "9090" in checks[0]
    cmd = next(line for line in reversed(lines) if line.startswith("CMD "))
    assert json.loads(cmd[4:]) == ["dpal", "serve", "--host", "0.0.0.0", "--port", "9090"]


def _ignored(path: str, patterns: list[str]) -> bool:
    """.dockerignore semantics for top-level paths: the last matching pattern wins."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        if fnmatch.fnmatch(path, pat) or fnmatch.fnmatch(path, pat.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = []
    for line in _dockerfile_lines():
        if line.startswith("COPY ") and "--from" not in line:
            copied.extend(line.split()[1:-1])
    assert {"pyproject.toml", "dpal_core", "backend"} <= set(copied)
    for src in copied:
        assert not _ignored(src, patterns), f"{src} is copied but excluded by .dockerignore"
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
    for heavy in (".venv", ".git", "tests", ".dpal", "docker/.env", "runs"):
        assert _ignored(heavy, patterns), f"{heavy} would be sent to the Docker build context"
