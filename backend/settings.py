"""Server settings, read from the environment in exactly one place: :meth:`Settings.from_env`.

Every variable is documented in ``docs/settings.md``. A bad value raises :class:`SettingsError`
naming the variable and the value, except secrets (the API key, the basic-auth password, a Redis
password), which never appear in a message or in ``repr(settings)``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

PARADIGMS = ("coop", "adapter", "vpt")
LOG_LEVELS = ("CRITICAL", "FATAL", "ERROR", "WARNING", "WARN", "INFO", "DEBUG", "NOTSET")
MASK = "***"

_INT_RE = re.compile(r"^[0-9]+$")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:[0-9]+)$")
_HOST_LABEL_RE = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_Getter = Callable[[str], "str | None"]  # the env lookup from_env passes around


class SettingsError(ValueError):
    """An environment variable holds an unusable value; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    """Server configuration. Build it with :meth:`from_env`; fields are already validated there."""

    label_studio_url: str = "http://localhost:8080"  # LABEL_STUDIO_URL, no trailing slash
    label_studio_api_key: str | None = field(default=None, repr=False)  # LABEL_STUDIO_API_KEY; secret
    model: str = "openai/clip-vit-base-patch16"  # DPAL_MODEL: Hugging Face id or local folder
    model_dir: Path = Path("./.dpal/models")  # MODEL_DIR: versions per project, embedding cache
    cache_dir_override: Path | None = None  # DPAL_CACHE_DIR; use the ``cache_dir`` property
    redis_url: str | None = field(default=None, repr=False)  # REDIS_URL; None = in-process queue
    train_threshold: int = 10  # DPAL_TRAIN_THRESHOLD: new annotations that trigger a retrain
    paradigm: str = "adapter"  # DPAL_PARADIGM: coop, adapter or vpt (adapter: best in dpal bench)
    device: str = "auto"  # DPAL_DEVICE: auto, cpu, cuda, cuda:N
    extra_allowed_hosts: frozenset[str] = frozenset()  # DPAL_ALLOWED_HOSTS, lower-cased
    max_image_bytes: int = 26_214_400  # DPAL_MAX_IMAGE_BYTES (25 MiB)
    max_image_pixels: int = 89_478_485  # DPAL_MAX_IMAGE_PIXELS (Pillow's bomb limit)
    fetch_concurrency: int = 8  # DPAL_FETCH_CONCURRENCY: parallel downloads per request
    predict_batch: int = 64  # DPAL_PREDICT_BATCH: images per encoder batch
    basic_auth_user: str | None = None  # BASIC_AUTH_USER
    basic_auth_pass: str | None = field(default=None, repr=False)  # BASIC_AUTH_PASS; secret
    local_files_document_root: Path | None = None  # LOCAL_FILES_DOCUMENT_ROOT
    log_level: str = "INFO"  # LOG_LEVEL, upper-cased

    @property
    def cache_dir(self) -> Path:
        """Embedding cache folder: ``DPAL_CACHE_DIR``, else ``$MODEL_DIR/embeddings``."""
        return (
            self.cache_dir_override if self.cache_dir_override is not None else self.model_dir / "embeddings"
        )

    @property
    def label_studio_host(self) -> str:
        """Host name of ``LABEL_STUDIO_URL``, lower-cased."""
        return (urlsplit(self.label_studio_url).hostname or "").lower()

    @property
    def allowed_hosts(self) -> frozenset[str]:
        """Hosts images may be fetched from: Label Studio's host plus ``DPAL_ALLOWED_HOSTS``."""
        return frozenset({self.label_studio_host}) | self.extra_allowed_hosts

    @property
    def basic_auth_enabled(self) -> bool:
        return self.basic_auth_user is not None and self.basic_auth_pass is not None

    def __repr__(self) -> str:
        shown = {
            "label_studio_url": self.label_studio_url,
            "label_studio_api_key": MASK if self.label_studio_api_key else None,
            "model": self.model,
            "model_dir": self.model_dir,
            "cache_dir": self.cache_dir,
            "redis_url": _mask_url_password(self.redis_url) if self.redis_url else None,
            "train_threshold": self.train_threshold,
            "paradigm": self.paradigm,
            "device": self.device,
            "extra_allowed_hosts": sorted(self.extra_allowed_hosts),
            "max_image_bytes": self.max_image_bytes,
            "max_image_pixels": self.max_image_pixels,
            "fetch_concurrency": self.fetch_concurrency,
            "predict_batch": self.predict_batch,
            "basic_auth_user": self.basic_auth_user,
            "basic_auth_pass": MASK if self.basic_auth_pass else None,
            "local_files_document_root": self.local_files_document_root,
            "log_level": self.log_level,
        }
        return "Settings(" + ", ".join(f"{k}={v!r}" for k, v in shown.items()) + ")"

    __str__ = __repr__

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read and validate every variable of ``docs/settings.md``.

        Args:
            environ: the environment to read (default ``os.environ``). Empty values count as unset.
        Returns:
            validated settings.
        Raises:
            SettingsError: a value is unusable; the message names the variable.
        """
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name)
            if value is None or not value.strip():
                return None
            return value.strip()

        model_dir = Path(get("MODEL_DIR") or "./.dpal/models")
        cache_dir = get("DPAL_CACHE_DIR")
        user, password = get("BASIC_AUTH_USER"), get("BASIC_AUTH_PASS")
        if (user is None) != (password is None):
            missing = "BASIC_AUTH_PASS" if password is None else "BASIC_AUTH_USER"
            raise SettingsError(
                f"BASIC_AUTH_USER and BASIC_AUTH_PASS must be set together; {missing} is missing"
            )
        return cls(
            label_studio_url=_parse_ls_url(get("LABEL_STUDIO_URL") or "http://localhost:8080"),
            label_studio_api_key=get("LABEL_STUDIO_API_KEY"),
            model=get("DPAL_MODEL") or "openai/clip-vit-base-patch16",
            model_dir=model_dir,
            cache_dir_override=Path(cache_dir) if cache_dir else None,
            redis_url=_parse_redis_url(get("REDIS_URL")),
            train_threshold=_parse_int(get, "DPAL_TRAIN_THRESHOLD", 10),
            paradigm=_parse_choice(get, "DPAL_PARADIGM", "adapter", PARADIGMS),
            device=_parse_device(get("DPAL_DEVICE")),
            extra_allowed_hosts=_parse_hosts(get("DPAL_ALLOWED_HOSTS")),
            max_image_bytes=_parse_int(get, "DPAL_MAX_IMAGE_BYTES", 26_214_400),
            max_image_pixels=_parse_int(get, "DPAL_MAX_IMAGE_PIXELS", 89_478_485),
            fetch_concurrency=_parse_int(get, "DPAL_FETCH_CONCURRENCY", 8, maximum=256),
            predict_batch=_parse_int(get, "DPAL_PREDICT_BATCH", 64, maximum=65_536),
            basic_auth_user=user,
            basic_auth_pass=password,
            local_files_document_root=_parse_root(get("LOCAL_FILES_DOCUMENT_ROOT")),
            log_level=_parse_choice(get, "LOG_LEVEL", "INFO", LOG_LEVELS, upper=True),
        )


def _parse_int(get: _Getter, name: str, default: int, *, minimum: int = 1, maximum: int | None = None) -> int:
    raw = get(name)
    if raw is None:
        return default
    if not _INT_RE.match(raw):
        raise SettingsError(f"{name}={raw!r} is not a whole number")
    value = int(raw)
    if value < minimum:
        raise SettingsError(f"{name}={raw!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingsError(f"{name}={raw!r} must be at most {maximum}")
    return value


def _parse_choice(
    get: _Getter, name: str, default: str, options: tuple[str, ...], *, upper: bool = False
) -> str:
    raw = get(name)
    if raw is None:
        return default
    value = raw.upper() if upper else raw.lower()
    if value not in options:
        raise SettingsError(f"{name}={raw!r} is not one of: {', '.join(options)}")
    return value


def _parse_device(raw: str | None) -> str:
    if raw is None:
        return "auto"
    if not _DEVICE_RE.match(raw.lower()):
        raise SettingsError(f"DPAL_DEVICE={raw!r} is not one of: auto, cpu, cuda, cuda:N")
    return raw.lower()


def _parse_ls_url(raw: str) -> str:
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SettingsError(f"LABEL_STUDIO_URL={_mask_url_password(raw)!r} is not a valid URL") from None
    if parts.username is not None or parts.password is not None:
        raise SettingsError(
            f"LABEL_STUDIO_URL={_mask_url_password(raw)!r} must not contain a user name or password; "
            "put the token in LABEL_STUDIO_API_KEY"
        )
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SettingsError(
            f"LABEL_STUDIO_URL={raw!r} must be an http:// or https:// URL with a host, "
            "e.g. http://localhost:8080"
        )
    if parts.query or parts.fragment:
        raise SettingsError(f"LABEL_STUDIO_URL={raw!r} must not have a query or fragment")
    return raw.rstrip("/")


def _parse_redis_url(raw: str | None) -> str | None:
    if raw is None:
        return None
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise SettingsError(f"REDIS_URL={_mask_url_password(raw)!r} is not a valid URL") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise SettingsError(
            f"REDIS_URL={_mask_url_password(raw)!r} must start with redis://, rediss:// or unix://"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise SettingsError(f"REDIS_URL={_mask_url_password(raw)!r} has no host")
    return raw


def _parse_hosts(raw: str | None) -> frozenset[str]:
    if raw is None:
        return frozenset()
    hosts = set()
    for item in raw.split(","):
        host = item.strip().lower()
        if not host:
            continue
        if not _is_host(host):
            raise SettingsError(
                f"DPAL_ALLOWED_HOSTS entry {item.strip()!r} is not a bare host name "
                "(write cdn.example.com, without scheme, port, path or wildcard)"
            )
        hosts.add(host)
    return frozenset(hosts)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not name or len(name) > 253:
        return False
    try:
        name = name.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    return all(_HOST_LABEL_RE.match(label) for label in name.split("."))


def _parse_root(raw: str | None) -> Path | None:
    if raw is None:
        return None
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise SettingsError(f"LOCAL_FILES_DOCUMENT_ROOT={raw!r} is not an existing directory")
    resolved = path.resolve()
    if resolved == Path(resolved.anchor):
        raise SettingsError(
            f"LOCAL_FILES_DOCUMENT_ROOT={raw!r} is the file system root; point it at the folder "
            "Label Studio serves local files from"
        )
    return resolved


def _mask_url_password(url: str) -> str:
    """Hide the password of ``scheme://user:password@host/...`` (all of a colon-less user info)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    if not at:
        return url
    user, colon, _ = userinfo.partition(":")
    masked = f"{user}:{MASK}" if colon else MASK
    return f"{scheme}://{masked}@{hostport}{rest[end:]}"
