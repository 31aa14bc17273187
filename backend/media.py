"""Guarded image fetching for Label Studio tasks.

Task data is written by whoever imports tasks, so every image URL is treated as hostile: the
backend fetches only from Label Studio itself (with the API key), from hosts the operator listed
in ``DPAL_ALLOWED_HOSTS`` (without the key), from ``LOCAL_FILES_DOCUMENT_ROOT`` on disk, from
``data:`` URIs, and from cloud storage through Label Studio's presign endpoint. Everything else is
refused with a :class:`MediaError` whose message says why and never contains the API key.

URL kinds:
    ``/data/upload/...``            joined with LABEL_STUDIO_URL, sent with the key
    ``/data/local-files/?d=<path>``  read from LOCAL_FILES_DOCUMENT_ROOT when set, else as above
    ``http(s)://host/...``          Label Studio's origin (with the key) or an allow-listed host
    ``s3:// gs:// azure-blob://``   ``GET {LS}/tasks/{id}/presign/?fileuri=<base64>``, whose one
                                    redirect may go to an https host that is allow-listed or public
    ``data:image/...;base64,...``   decoded locally
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import json
import re
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import TYPE_CHECKING
from urllib.parse import parse_qs

import httpx
from PIL import Image

from dpal_core.errors import ImageError
from dpal_core.images import load_image

if TYPE_CHECKING:
    from backend.settings import Settings

MAX_REDIRECTS = 3
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
USER_AGENT = "dpal-ml-backend"
_TOKEN_MARGIN_S = 30.0  # refresh a personal-access-token JWT this long before it expires
_NAT64 = ipaddress.ip_network("64:ff9b::/96")


class MediaError(ValueError):
    """An image could not be fetched or was refused. The message is safe to log and to return."""


@dataclass(frozen=True)
class FetchPolicy:
    """What the fetcher may reach and how much it may download."""

    label_studio_url: str  # base URL; relative task URLs are joined with it
    api_key: str | None = field(repr=False)  # legacy token or personal access token (JWT)
    allowed_hosts: frozenset[str]  # hosts fetched without the key (Label Studio's may be in it)
    local_files_root: Path | None  # read /data/local-files/?d= from here when set
    max_bytes: int  # larger downloads are aborted
    max_pixels: int  # larger images are refused by load_image
    timeout_s: float = 20.0  # total seconds per image, redirects included

    def __post_init__(self) -> None:
        url = httpx.URL(self.label_studio_url)
        if url.scheme not in ("http", "https") or not url.host:
            raise ValueError(f"label_studio_url={self.label_studio_url!r} must be an http(s) URL with a host")
        if self.max_bytes < 1 or self.max_pixels < 1 or self.timeout_s <= 0:
            raise ValueError("max_bytes, max_pixels and timeout_s must be positive")

    @classmethod
    def from_settings(cls, settings: Settings, timeout_s: float = 20.0) -> FetchPolicy:
        return cls(
            label_studio_url=settings.label_studio_url,
            api_key=settings.label_studio_api_key,
            allowed_hosts=settings.allowed_hosts,
            local_files_root=settings.local_files_document_root,
            max_bytes=settings.max_image_bytes,
            max_pixels=settings.max_image_pixels,
            timeout_s=timeout_s,
        )


async def resolve_host(host: str, port: int) -> list[str]:
    """IP addresses ``host`` resolves to (a module function so tests can replace it)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass
class _Session:
    """An httpx client bound to one event loop (the async API and each sync call get their own)."""

    loop: asyncio.AbstractEventLoop
    client: httpx.AsyncClient
    auth_lock: asyncio.Lock


class MediaFetcher:
    """Fetches task images under a :class:`FetchPolicy`.

    Args:
        policy: what may be fetched.
        transport: an httpx transport to use instead of the network (tests).
    """

    def __init__(self, policy: FetchPolicy, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._policy = policy
        self._transport = transport
        self._ls_base = policy.label_studio_url.rstrip("/")
        ls = httpx.URL(self._ls_base)
        self._ls_origin = (ls.scheme, _host_of(ls), _port_of(ls))
        self._allowed = frozenset(_normalize_host(h) for h in policy.allowed_hosts)
        self._key_claims = _jwt_claims(policy.api_key) if policy.api_key else None
        self._access_token: str | None = None
        self._access_expires = 0.0
        self._async_session: _Session | None = None

    # ---- public API -------------------------------------------------------------------------

    async def fetch_bytes(self, url: str, task_id: int | None = None) -> bytes:
        """Download one image's bytes. Raises :class:`MediaError` when refused or failed."""
        return await self._fetch_guarded(self._session(), url, task_id)

    async def fetch_images(
        self,
        urls: Sequence[str],
        task_ids: Sequence[int | None] | None = None,
        concurrency: int = 8,
    ) -> list[Image.Image | MediaError | ImageError]:
        """Fetch and decode ``urls``; one entry per url, in order, failures returned in place."""
        return await self._fetch_images(self._session(), urls, task_ids, concurrency)

    def fetch_images_sync(
        self,
        urls: Sequence[str],
        task_ids: Sequence[int | None] | None = None,
        concurrency: int = 8,
    ) -> list[Image.Image | MediaError | ImageError]:
        """:meth:`fetch_images` for synchronous callers (the RQ worker); runs its own event loop."""

        async def run() -> list[Image.Image | MediaError | ImageError]:
            session = self._new_session()
            try:
                return await self._fetch_images(session, urls, task_ids, concurrency)
            finally:
                if self._transport is None:  # a caller's transport stays open for the caller
                    await session.client.aclose()

        return asyncio.run(run())

    async def aclose(self) -> None:
        session, self._async_session = self._async_session, None
        if session is not None and session.loop is asyncio.get_running_loop():
            await session.client.aclose()

    # ---- orchestration ----------------------------------------------------------------------

    def _new_session(self) -> _Session:
        client = httpx.AsyncClient(
            transport=self._transport,
            timeout=httpx.Timeout(self._policy.timeout_s),
            follow_redirects=False,  # every hop is checked by hand
            trust_env=False,  # no proxy or .netrc credentials picked up from the environment
            headers={"User-Agent": USER_AGENT},
        )
        return _Session(asyncio.get_running_loop(), client, asyncio.Lock())

    def _session(self) -> _Session:
        if self._async_session is None or self._async_session.loop is not asyncio.get_running_loop():
            self._async_session = self._new_session()
        return self._async_session

    async def _fetch_images(
        self,
        session: _Session,
        urls: Sequence[str],
        task_ids: Sequence[int | None] | None,
        concurrency: int,
    ) -> list[Image.Image | MediaError | ImageError]:
        ids = list(task_ids) if task_ids is not None else [None] * len(urls)
        if len(ids) != len(urls):
            raise ValueError(f"task_ids has {len(ids)} entries for {len(urls)} urls")
        semaphore = asyncio.Semaphore(max(1, concurrency))

        async def one(url: str, task_id: int | None) -> Image.Image | MediaError | ImageError:
            async with semaphore:
                try:
                    data = await self._fetch_guarded(session, url, task_id)
                    return await asyncio.to_thread(
                        load_image, data, max_pixels=self._policy.max_pixels, name=_display(url)
                    )
                except (MediaError, ImageError) as exc:
                    return exc

        return list(await asyncio.gather(*(one(u, t) for u, t in zip(urls, ids, strict=True))))

    async def _fetch_guarded(self, session: _Session, url: str, task_id: int | None) -> bytes:
        """:meth:`_fetch` under the total timeout, with transport errors turned into MediaError."""
        shown = _display(url) if isinstance(url, str) else repr(url)
        try:
            return await asyncio.wait_for(self._fetch(session, url, task_id), self._policy.timeout_s)
        except (asyncio.TimeoutError, TimeoutError, httpx.TimeoutException):
            raise MediaError(f"{shown}: timed out after {self._policy.timeout_s:g} s") from None
        except httpx.InvalidURL as exc:
            raise self._error(f"{shown}: invalid URL ({exc})") from None
        except httpx.HTTPError as exc:
            raise self._error(f"{shown}: download failed ({type(exc).__name__}: {exc})") from None

    async def _fetch(self, session: _Session, url: str, task_id: int | None) -> bytes:
        if not isinstance(url, str) or not url.strip():
            raise MediaError("the task has an empty image URL")
        url = url.strip()
        shown = _display(url)
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "data":
            return self._decode_data_uri(url, shown)
        if scheme in CLOUD_SCHEMES and url[len(scheme) : len(scheme) + 3] == "://":
            return await self._fetch_cloud(session, url, task_id, shown)
        if url.startswith(("//", "/\\")):
            raise MediaError(f"{shown}: protocol-relative URLs are refused")
        if url.startswith("/"):
            if self._policy.local_files_root is not None and _is_local_files(url):
                return await self._read_local(url, shown)
            return await self._download(session, httpx.URL(self._ls_base + url), shown)
        return await self._download(session, httpx.URL(url), shown)

    # ---- sources ----------------------------------------------------------------------------

    def _decode_data_uri(self, url: str, shown: str) -> bytes:
        header, comma, payload = url[5:].partition(",")
        if not comma:
            raise MediaError(f"{shown}: malformed data: URI (no comma)")
        if not header.lower().endswith(";base64"):
            raise MediaError(f"{shown}: only base64 data: URIs are supported (data:image/png;base64,...)")
        payload = "".join(payload.split())
        if len(payload) // 4 * 3 > self._policy.max_bytes + 3:
            raise self._too_large(shown, len(payload) // 4 * 3)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise MediaError(f"{shown}: the data: URI is not valid base64") from None
        if len(data) > self._policy.max_bytes:
            raise self._too_large(shown, len(data))
        return data

    async def _fetch_cloud(self, session: _Session, uri: str, task_id: int | None, shown: str) -> bytes:
        if task_id is None:
            raise MediaError(
                f"{shown}: a cloud storage URI needs the task id to be presigned by Label Studio"
            )
        if isinstance(task_id, bool) or not isinstance(task_id, int) or task_id < 0:
            raise MediaError(f"{shown}: task id {task_id!r} is not a non-negative integer")
        fileuri = base64.urlsafe_b64encode(uri.encode()).decode("ascii")
        target = httpx.URL(f"{self._ls_base}/tasks/{task_id}/presign/?fileuri={fileuri}")
        return await self._download(session, target, shown, presign=True)

    async def _read_local(self, url: str, shown: str) -> bytes:
        path = self._local_path(self._policy.local_files_root, url, shown)
        limit = self._policy.max_bytes

        def read() -> bytes:
            with open(path, "rb") as fh:
                return fh.read(limit + 1)

        try:
            data = await asyncio.to_thread(read)
        except OSError as exc:
            raise MediaError(f"{shown}: cannot read local file ({exc.strerror or exc})") from None
        if len(data) > limit:
            raise self._too_large(shown, path.stat().st_size)
        return data

    @staticmethod
    def _local_path(root: Path, url: str, shown: str) -> Path:
        values = parse_qs(url.partition("?")[2], keep_blank_values=True).get("d")
        rel = values[-1] if values else ""
        if not rel:
            raise MediaError(f"{shown}: local-files URL without a ?d= path")
        if "\x00" in rel:
            raise MediaError(f"{shown}: NUL byte in the local file path")
        if rel.startswith(("/", "\\")) or PureWindowsPath(rel).drive:
            raise MediaError(
                f"{shown}: absolute local file paths are refused; ?d= is relative to LOCAL_FILES_DOCUMENT_ROOT"
            )
        if ".." in re.split(r"[\\/]", rel):
            raise MediaError(f"{shown}: '..' in a local file path is refused")
        base = root.resolve()
        try:
            path = (base / rel).resolve(strict=True)
        except FileNotFoundError:
            raise MediaError(f"{shown}: no such file under LOCAL_FILES_DOCUMENT_ROOT") from None
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on Python < 3.13
            raise MediaError(f"{shown}: cannot resolve the local file path ({exc})") from None
        if not path.is_relative_to(base):
            raise MediaError(
                f"{shown}: the path leads outside LOCAL_FILES_DOCUMENT_ROOT (a symlink?) and is refused"
            )
        if not path.is_file():
            raise MediaError(f"{shown}: not a regular file under LOCAL_FILES_DOCUMENT_ROOT")
        return path

    # ---- HTTP -------------------------------------------------------------------------------

    async def _download(
        self, session: _Session, url: httpx.URL, shown: str, *, presign: bool = False
    ) -> bytes:
        """GET ``url``, following at most MAX_REDIRECTS redirects, each re-checked."""
        to_ls = self._check_url(url, shown)
        with_key = to_ls  # the key goes out only while the whole chain stays on Label Studio
        awaiting_presign = presign
        retried_auth = False
        hops = 0
        while True:
            headers = await self._auth_headers(session) if with_key else {}
            request = session.client.build_request("GET", url, headers=headers)
            response = await session.client.send(request, stream=True)
            try:
                status = response.status_code
                if status in REDIRECT_CODES:
                    location = response.headers.get("location")
                    if not location:
                        raise MediaError(f"{shown}: HTTP {status} redirect without a Location header")
                    hops += 1
                    if hops > MAX_REDIRECTS:
                        raise MediaError(f"{shown}: more than {MAX_REDIRECTS} redirects")
                    nxt = url.join(location)
                    if (
                        with_key
                        and _host_of(nxt) == self._ls_origin[1]
                        and nxt.path.startswith("/user/login")
                    ):
                        raise MediaError(
                            f"{shown}: Label Studio redirected to its login page; check LABEL_STUDIO_API_KEY"
                        )
                    if awaiting_presign:
                        to_ls = await self._check_presigned(nxt, shown)
                        awaiting_presign = False
                    else:
                        to_ls = self._check_url(nxt, shown)
                    with_key = with_key and to_ls
                    url = nxt
                    continue
                if status in (401, 403) and with_key:
                    if status == 401 and self._is_refresh_token() and not retried_auth:
                        retried_auth = True
                        self._access_token = None  # expired or revoked: exchange the key again
                        continue
                    raise MediaError(f"{shown}: Label Studio answered HTTP {status}; {self._key_hint()}")
                if status >= 400:
                    where = "Label Studio" if to_ls else _origin_text(url)
                    raise MediaError(f"{shown}: {where} answered HTTP {status}")
                if status >= 300 or status < 200:
                    raise MediaError(f"{shown}: unexpected HTTP {status}")
                if with_key and response.headers.get("content-type", "").startswith("text/html"):
                    raise MediaError(
                        f"{shown}: Label Studio answered with an HTML page, not an image; "
                        "check LABEL_STUDIO_API_KEY and that the URL points at a file"
                    )
                return await self._read_body(response, shown)
            finally:
                await response.aclose()

    async def _read_body(self, response: httpx.Response, shown: str) -> bytes:
        limit = self._policy.max_bytes
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise self._too_large(shown, int(declared))
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > limit:
                raise MediaError(f"{shown}: download aborted past {limit} bytes (DPAL_MAX_IMAGE_BYTES)")
        return bytes(body)

    def _check_url(self, url: httpx.URL, shown: str) -> bool:
        """Refuse a URL outside the policy; return whether it is Label Studio's own origin."""
        if url.scheme not in ("http", "https"):
            scheme = url.scheme or "relative"
            raise MediaError(
                f"{shown}: {scheme!r} URLs are refused (allowed: http(s) to Label Studio or "
                "DPAL_ALLOWED_HOSTS, /data/ paths, data: URIs, s3://, gs://, azure-blob://)"
            )
        if url.userinfo:
            raise MediaError(f"{shown}: URLs with a user name or password (user@host) are refused")
        host = _host_of(url)
        if not host:
            raise MediaError(f"{shown}: the URL has no host")
        if host == self._ls_origin[1]:
            if (url.scheme, _port_of(url)) == self._ls_origin[::2]:
                return True
            raise MediaError(
                f"{shown}: {_origin_text(url)} is Label Studio's host on another scheme or port "
                "than LABEL_STUDIO_URL and is refused"
            )
        if host in self._allowed:
            return False
        raise MediaError(
            f"{shown}: host {host!r} is neither Label Studio's ({self._ls_origin[1]!r}) nor listed "
            "in DPAL_ALLOWED_HOSTS"
        )

    async def _check_presigned(self, url: httpx.URL, shown: str) -> bool:
        """The presign endpoint's redirect: Label Studio itself, or https to an allowed/public host."""
        host = _host_of(url)
        if host == self._ls_origin[1]:
            return self._check_url(url, shown)
        if url.scheme != "https" or url.userinfo or not host:
            raise MediaError(
                f"{shown}: presigned redirect to {_origin_text(url)} refused (https only, no user info)"
            )
        if host in self._allowed:
            return False
        try:
            addresses = [host] if _is_ip(host) else await resolve_host(host, _port_of(url))
        except OSError as exc:
            raise MediaError(f"{shown}: cannot resolve presigned storage host {host!r} ({exc})") from None
        if not addresses or not all(_is_public(a) for a in addresses):
            raise MediaError(
                f"{shown}: presigned redirect to {host!r} refused: it resolves to a non-public address "
                "(add the host to DPAL_ALLOWED_HOSTS if it is your storage)"
            )
        return False

    # ---- Label Studio credentials -----------------------------------------------------------

    def _is_refresh_token(self) -> bool:
        return self._key_claims is not None and self._key_claims.get("token_type") == "refresh"

    async def _auth_headers(self, session: _Session) -> dict[str, str]:
        key = self._policy.api_key
        if not key:
            return {}
        if self._key_claims is None:
            return {"Authorization": f"Token {key}"}  # legacy token
        if not self._is_refresh_token():
            return {"Authorization": f"Bearer {key}"}  # already an access token
        if self._access_token is None or time.time() > self._access_expires - _TOKEN_MARGIN_S:
            async with session.auth_lock:
                if self._access_token is None or time.time() > self._access_expires - _TOKEN_MARGIN_S:
                    await self._refresh_access_token(session, key)
        return {"Authorization": f"Bearer {self._access_token}"}

    async def _refresh_access_token(self, session: _Session, key: str) -> None:
        """Exchange a personal access token (JWT refresh token) for a short-lived access token."""
        response = await session.client.post(f"{self._ls_base}/api/token/refresh/", json={"refresh": key})
        if response.status_code != 200:
            raise MediaError(
                f"Label Studio refused to exchange LABEL_STUDIO_API_KEY (a personal access token) for "
                f"an access token (HTTP {response.status_code}); {self._key_hint()}"
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError):
            raise MediaError("Label Studio's /api/token/refresh/ answer has no access token") from None
        claims = _jwt_claims(access) or {}
        exp = claims.get("exp")
        self._access_expires = float(exp) if isinstance(exp, (int, float)) else time.time() + 60.0
        self._access_token = access

    def _key_hint(self) -> str:
        if not self._policy.api_key:
            return "LABEL_STUDIO_API_KEY is not set: set it to a Label Studio access token"
        return "check LABEL_STUDIO_API_KEY (the token was refused or lacks access to this project)"

    # ---- messages ---------------------------------------------------------------------------

    def _too_large(self, shown: str, size: int) -> MediaError:
        limit = self._policy.max_bytes
        return MediaError(f"{shown}: {size} bytes is over the limit of {limit} bytes (DPAL_MAX_IMAGE_BYTES)")

    def _error(self, message: str) -> MediaError:
        key = self._policy.api_key
        if key:
            message = message.replace(key, "***")
            if self._access_token:
                message = message.replace(self._access_token, "***")
        return MediaError(message)


def _is_local_files(url: str) -> bool:
    path = url.partition("?")[0]
    return path in ("/data/local-files/", "/data/local-files")


def _host_of(url: httpx.URL) -> str:
    return _normalize_host(url.raw_host.decode("ascii")) if url.raw_host else ""


def _port_of(url: httpx.URL) -> int:
    return url.port or (443 if url.scheme == "https" else 80)


def _normalize_host(host: str) -> str:
    """Lower-cased ASCII (IDNA) host without a trailing dot; IP addresses in canonical form."""
    host = host.strip().strip("[]").lower().rstrip(".")
    if _is_ip(host):
        return ipaddress.ip_address(host).compressed
    try:
        return httpx.URL(f"http://{host}/").raw_host.decode("ascii").lower()
    except (httpx.InvalidURL, UnicodeError):
        return host


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _is_public(address: str) -> bool:
    """Whether ``address`` is a globally routable unicast IP (not private, loopback, link-local...)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif ip in _NAT64:
            ip = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.is_global and not ip.is_multicast


def _jwt_claims(token: str) -> dict | None:
    """The payload of a JWT, unverified (only to tell token kinds apart), or None if not a JWT."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        header, claims = (json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4))) for p in parts[:2])
    except (ValueError, binascii.Error):
        return None
    if not isinstance(header, dict) or "alg" not in header or not isinstance(claims, dict):
        return None
    return claims


def _origin_text(url: httpx.URL) -> str:
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}"


def _display(url: str, limit: int = 160) -> str:
    """A task URL as it may appear in logs and responses: printable, short, data: URIs abbreviated."""
    if url[:5].lower() == "data:":
        head = url[: min(url.find(","), 40)] if "," in url else url[:40]
        text = f"{head},... ({len(url)} chars)"
    else:
        text = url if len(url) <= limit else url[:limit] + "..."
    return "".join(c if c.isprintable() else "?" for c in text)
