"""backend.settings: defaults from docs/settings.md, one message per bad value, secrets never shown."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from backend.settings import Settings, SettingsError

SECRET = "s3cr3t-token-0123456789abcdef"


def test_defaults_match_docs() -> None:
    s = Settings.from_env({})
    assert s.label_studio_url == "http://localhost:8080"
    assert s.label_studio_api_key is None
    assert s.model == "openai/clip-vit-base-patch16"
    assert s.model_dir == Path("./.dpal/models")
    assert s.cache_dir == Path("./.dpal/models/embeddings")
    assert s.redis_url is None
    assert s.train_threshold == 10
    assert s.paradigm == "adapter"
    assert s.device == "auto"
    assert s.extra_allowed_hosts == frozenset()
    assert s.allowed_hosts == frozenset({"localhost"})
    assert s.max_image_bytes == 26_214_400
    assert s.max_image_pixels == 89_478_485
    assert s.fetch_concurrency == 8
    assert s.predict_batch == 64
    assert (s.basic_auth_user, s.basic_auth_pass, s.basic_auth_enabled) == (None, None, False)
    assert s.local_files_document_root is None
    assert s.log_level == "INFO"


def test_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        Settings.from_env({}).paradigm = "vpt"  # type: ignore[misc]


def test_every_variable_read(tmp_path: Path) -> None:
    env = {
        "LABEL_STUDIO_URL": "https://ls.example.com:8443/",
        "LABEL_STUDIO_API_KEY": SECRET,
        "DPAL_MODEL": "/models/clip",
        "MODEL_DIR": str(tmp_path / "m"),
        "DPAL_CACHE_DIR": str(tmp_path / "c"),
        "REDIS_URL": "redis://redis:6379/0",
        "DPAL_TRAIN_THRESHOLD": " 25 ",
        "DPAL_PARADIGM": "VPT",
        "DPAL_DEVICE": "cuda:1",
        "DPAL_ALLOWED_HOSTS": "cdn.example.com, Images.Example.org,,10.0.0.5",
        "DPAL_MAX_IMAGE_BYTES": "1000",
        "DPAL_MAX_IMAGE_PIXELS": "2000",
        "DPAL_FETCH_CONCURRENCY": "4",
        "DPAL_PREDICT_BATCH": "32",
        "BASIC_AUTH_USER": "admin",
        "BASIC_AUTH_PASS": "hunter2",
        "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
        "LOG_LEVEL": "debug",
    }
    s = Settings.from_env(env)
    assert s.label_studio_url == "https://ls.example.com:8443"
    assert s.label_studio_host == "ls.example.com"
    assert s.label_studio_api_key == SECRET
    assert s.model == "/models/clip"
    assert s.model_dir == tmp_path / "m"
    assert s.cache_dir == tmp_path / "c"
    assert s.redis_url == "redis://redis:6379/0"
    assert s.train_threshold == 25
    assert s.paradigm == "vpt"
    assert s.device == "cuda:1"
    assert s.extra_allowed_hosts == {"cdn.example.com", "images.example.org", "10.0.0.5"}
    assert s.allowed_hosts == {"ls.example.com", "cdn.example.com", "images.example.org", "10.0.0.5"}
    assert (s.max_image_bytes, s.max_image_pixels, s.fetch_concurrency, s.predict_batch) == (
        1000,
        2000,
        4,
        32,
    )
    assert s.basic_auth_enabled
    assert s.local_files_document_root == tmp_path.resolve()
    assert s.log_level == "DEBUG"


def test_cache_dir_follows_model_dir() -> None:
    assert Settings.from_env({"MODEL_DIR": "/srv/dpal"}).cache_dir == Path("/srv/dpal/embeddings")


def test_empty_values_count_as_unset() -> None:
    s = Settings.from_env({"LABEL_STUDIO_API_KEY": "", "DPAL_TRAIN_THRESHOLD": "  ", "REDIS_URL": ""})
    assert (s.label_studio_api_key, s.train_threshold, s.redis_url) == (None, 10, None)


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DPAL_PARADIGM", "coop")
    assert Settings.from_env().paradigm == "coop"


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("DPAL_TRAIN_THRESHOLD", "ten", "DPAL_TRAIN_THRESHOLD='ten' is not a whole number"),
        ("DPAL_TRAIN_THRESHOLD", "2.5", "DPAL_TRAIN_THRESHOLD='2.5' is not a whole number"),
        ("DPAL_TRAIN_THRESHOLD", "-3", "DPAL_TRAIN_THRESHOLD='-3' is not a whole number"),
        ("DPAL_TRAIN_THRESHOLD", "0", "DPAL_TRAIN_THRESHOLD='0' must be at least 1"),
        ("DPAL_MAX_IMAGE_BYTES", "0", "DPAL_MAX_IMAGE_BYTES='0' must be at least 1"),
        ("DPAL_MAX_IMAGE_PIXELS", "lots", "DPAL_MAX_IMAGE_PIXELS='lots'"),
        ("DPAL_FETCH_CONCURRENCY", "0", "DPAL_FETCH_CONCURRENCY='0'"),
        ("DPAL_FETCH_CONCURRENCY", "100000", "DPAL_FETCH_CONCURRENCY='100000' must be at most 256"),
        ("DPAL_PREDICT_BATCH", "x", "DPAL_PREDICT_BATCH='x'"),
        ("DPAL_PARADIGM", "lora", "DPAL_PARADIGM='lora' is not one of: coop, adapter, vpt"),
        ("DPAL_DEVICE", "gpu", "DPAL_DEVICE='gpu' is not one of: auto, cpu, cuda, cuda:N"),
        ("DPAL_DEVICE", "cuda:x", "DPAL_DEVICE='cuda:x'"),
        ("LOG_LEVEL", "loud", "LOG_LEVEL='loud' is not one of"),
        (
            "LABEL_STUDIO_URL",
            "localhost:8080",
            "LABEL_STUDIO_URL='localhost:8080' must be an http:// or https://",
        ),
        ("LABEL_STUDIO_URL", "ftp://ls", "LABEL_STUDIO_URL='ftp://ls'"),
        ("LABEL_STUDIO_URL", "http://", "LABEL_STUDIO_URL='http://'"),
        ("LABEL_STUDIO_URL", "http://ls:99999", "LABEL_STUDIO_URL='http://ls:99999' is not a valid URL"),
        ("LABEL_STUDIO_URL", "http://ls/?x=1", "must not have a query"),
        ("REDIS_URL", "http://redis", "REDIS_URL='http://redis' must start with redis://"),
        ("REDIS_URL", "redis://", "REDIS_URL='redis://' has no host"),
        (
            "DPAL_ALLOWED_HOSTS",
            "ok.com,https://cdn.example.com",
            "'https://cdn.example.com' is not a bare host",
        ),
        ("DPAL_ALLOWED_HOSTS", "*.example.com", "DPAL_ALLOWED_HOSTS entry '*.example.com'"),
        ("DPAL_ALLOWED_HOSTS", "cdn.example.com:443", "DPAL_ALLOWED_HOSTS entry 'cdn.example.com:443'"),
        (
            "LOCAL_FILES_DOCUMENT_ROOT",
            "/definitely/not/here",
            "LOCAL_FILES_DOCUMENT_ROOT='/definitely/not/here'",
        ),
        ("LOCAL_FILES_DOCUMENT_ROOT", "/", "is the file system root"),
    ],
)
def test_bad_value_names_variable(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({name: value})
    assert name in str(info.value)
    assert message in str(info.value)
    assert isinstance(info.value, ValueError)


def test_local_files_root_must_be_directory(tmp_path: Path) -> None:
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(SettingsError, match="LOCAL_FILES_DOCUMENT_ROOT=.*is not an existing directory"):
        Settings.from_env({"LOCAL_FILES_DOCUMENT_ROOT": str(f)})


@pytest.mark.parametrize("present", ["BASIC_AUTH_USER", "BASIC_AUTH_PASS"])
def test_basic_auth_needs_both(present: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({present: SECRET})
    assert "BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together" in str(info.value)
    assert SECRET not in str(info.value)


def test_secrets_masked_in_repr() -> None:
    s = Settings.from_env(
        {
            "LABEL_STUDIO_API_KEY": SECRET,
            "BASIC_AUTH_USER": "admin",
            "BASIC_AUTH_PASS": "pw-" + SECRET,
            "REDIS_URL": f"redis://default:{SECRET}@redis:6379/0",
        }
    )
    for text in (repr(s), str(s), f"{s}"):
        assert SECRET not in text
        assert "label_studio_api_key='***'" in text
        assert "basic_auth_pass='***'" in text
        assert "redis://default:***@redis:6379/0" in text
        assert "basic_auth_user='admin'" in text


def test_secrets_not_in_url_errors() -> None:
    for name, value in [
        ("LABEL_STUDIO_URL", f"http://admin:{SECRET}@ls:8080"),
        ("REDIS_URL", f"http://user:{SECRET}@redis"),
        ("REDIS_URL", f"redis://user:{SECRET}@redis:notaport"),
    ]:
        with pytest.raises(SettingsError) as info:
            Settings.from_env({name: value})
        assert name in str(info.value)
        assert SECRET not in str(info.value)
        assert "***" in str(info.value)


def test_api_key_never_in_any_error() -> None:
    # A bad value elsewhere must not drag the key into the message.
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"LABEL_STUDIO_API_KEY": SECRET, "DPAL_PARADIGM": "nope"})
    assert SECRET not in str(info.value)
