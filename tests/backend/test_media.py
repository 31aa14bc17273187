"""backend.media: what may be fetched, with which credentials, and how much.

Real HTTP servers on 127.0.0.1 where the wire matters (headers sent, redirects, streaming limits);
httpx.MockTransport where the test is about policy (nothing may leave the process at all).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

import backend.media as media
from backend.media import FetchPolicy, MediaError, MediaFetcher
from dpal_core.errors import ImageError

KEY = "0123456789abcdef0123456789abcdef01234567"


def png(width: int = 8, height: int = 8, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format="PNG")
    return buf.getvalue()


PNG = png()

# ---- a small HTTP server -------------------------------------------------------------------

Route = Callable[[BaseHTTPRequestHandler], None]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"  # close-delimited bodies allowed (no Content-Length)

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        server: Server = self.server.owner  # type: ignore[attr-defined]
        server.requests.append((self.path, dict(self.headers)))
        route = server.routes.get(self.path) or server.routes.get(self.path.split("?", 1)[0])
        if route is None:
            self.send_response(404)
            self.end_headers()
            return
        route(self)

    def log_message(self, *args: object) -> None:
        pass


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # clients that give up early (timeouts, size limits) break the pipe; that is expected


class Server:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.httpd = _QuietServer(("127.0.0.1", 0), _Handler)
        self.httpd.owner = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def body(data: bytes, *, content_type: str = "image/png", length: bool = True) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def status(code: int, location: str | None = None) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        h.send_response(code)
        if location:
            h.send_header("Location", location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def slow(seconds: float) -> Route:
    def route(h: BaseHTTPRequestHandler) -> None:
        time.sleep(seconds)
        body(PNG)(h)

    return route


@pytest.fixture
def ls():
    server = Server()
    yield server
    server.close()


@pytest.fixture
def other():
    server = Server()
    yield server
    server.close()


def policy(ls_url: str = "http://ls.test:8080", **kw: object) -> FetchPolicy:
    values: dict = {
        "label_studio_url": ls_url,
        "api_key": KEY,
        "allowed_hosts": frozenset({urlsplit(ls_url).hostname}),
        "local_files_root": None,
        "max_bytes": 1_000_000,
        "max_pixels": 10_000_000,
        "timeout_s": 5.0,
    }
    values.update(kw)
    return FetchPolicy(**values)


def fetch(
    p: FetchPolicy, url: str, task_id: int | None = None, transport: httpx.AsyncBaseTransport | None = None
):
    """fetch_bytes in a fresh event loop; returns bytes or the MediaError raised."""

    async def run():
        fetcher = MediaFetcher(p, transport=transport)
        try:
            return await fetcher.fetch_bytes(url, task_id)
        except MediaError as exc:
            return exc
        finally:
            await fetcher.aclose()

    return asyncio.run(run())


def refusing_transport() -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError(f"no request may be sent, got {request.url}")

    return httpx.MockTransport(handler)


# ---- Label Studio and allow-listed hosts ---------------------------------------------------


def test_relative_upload_url_fetched_from_label_studio_with_token(ls: Server) -> None:
    ls.routes["/data/upload/1/a.png"] = body(PNG)
    assert fetch(policy(ls.url), "/data/upload/1/a.png") == PNG
    ((path, headers),) = ls.requests
    assert headers["Authorization"] == f"Token {KEY}"


def test_absolute_label_studio_url_gets_token(ls: Server) -> None:
    ls.routes["/data/upload/1/a.png"] = body(PNG)
    assert fetch(policy(ls.url), f"{ls.url}/data/upload/1/a.png") == PNG
    assert ls.requests[0][1]["Authorization"] == f"Token {KEY}"


def test_label_studio_under_a_path_prefix(ls: Server) -> None:
    ls.routes["/ls/data/upload/1/a.png"] = body(PNG)
    assert fetch(policy(ls.url + "/ls/"), "/data/upload/1/a.png") == PNG


def test_allow_listed_third_party_host_gets_no_token(ls: Server, other: Server) -> None:
    other.routes["/img.png"] = body(PNG)
    p = policy(ls.url, allowed_hosts=frozenset({"127.0.0.1", "localhost"}))
    assert fetch(p, f"http://localhost:{other.port}/img.png") == PNG
    ((_, headers),) = other.requests
    assert "Authorization" not in headers and "authorization" not in {k.lower() for k in headers}


def test_allow_listed_host_without_token_mock() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=PNG)

    p = policy(allowed_hosts=frozenset({"ls.test", "CDN.Example.com"}))
    assert fetch(p, "https://cdn.example.com/a.png", transport=httpx.MockTransport(handler)) == PNG
    assert "authorization" not in seen[0].headers


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://evil.example/a.png", "host 'evil.example' is neither Label Studio's"),
        ("http://169.254.169.254/latest/meta-data/", "host '169.254.169.254' is neither"),
        ("http://10.0.0.1/a.png", "host '10.0.0.1' is neither"),
        ("http://[::1]/a.png", "host '::1' is neither"),
        ("http://2130706433/", "is neither"),
        ("http://ls.test:8080@evil.example/a.png", "user name or password"),
        ("http://ls.test@evil.example/a.png", "user name or password"),
        ("http://user:pw@ls.test:8080/a.png", "user name or password"),
        ("http://ls.test:9999/a.png", "Label Studio's host on another scheme or port"),
        ("https://ls.test:8080/a.png", "Label Studio's host on another scheme or port"),
        ("file:///etc/passwd", "'file' URLs are refused"),
        ("ftp://ls.test/a.png", "'ftp' URLs are refused"),
        ("gopher://ls.test:8080/_x", "'gopher' URLs are refused"),
        ("javascript:alert(1)", "'javascript' URLs are refused"),
        ("//evil.example/a.png", "protocol-relative"),
        ("a.png", "URLs are refused"),
        ("", "empty image URL"),
        ("http://ls.test:8080\\x/a.png", "invalid URL"),
        ("http://[::1/a.png", "invalid URL"),
        ("s3://bucket/key.png", "needs the task id"),
        ("data:image/png,rawbytes", "only base64 data: URIs"),
        ("data:image/png;base64,@@@@", "not valid base64"),
    ],
)
def test_refused_without_any_request(url: str, reason: str) -> None:
    result = fetch(policy(), url, transport=refusing_transport())
    assert isinstance(result, MediaError), result
    assert reason in str(result)
    assert KEY not in str(result)


# ---- redirects -----------------------------------------------------------------------------


def test_redirect_within_label_studio_followed(ls: Server) -> None:
    ls.routes["/data/upload/old.png"] = status(302, "/data/upload/1/a.png")
    ls.routes["/data/upload/1/a.png"] = body(PNG)
    assert fetch(policy(ls.url), "/data/upload/old.png") == PNG
    assert [r[0] for r in ls.requests] == ["/data/upload/old.png", "/data/upload/1/a.png"]
    assert all(r[1]["Authorization"] == f"Token {KEY}" for r in ls.requests)


def test_redirect_from_label_studio_to_other_host_refused(ls: Server, other: Server) -> None:
    other.routes["/a.png"] = body(PNG)
    ls.routes["/data/upload/a.png"] = status(302, f"http://localhost:{other.port}/a.png")
    result = fetch(policy(ls.url), "/data/upload/a.png")
    assert isinstance(result, MediaError)
    assert "host 'localhost' is neither" in str(result)
    assert other.requests == []


def test_redirect_to_allow_listed_host_drops_token(ls: Server, other: Server) -> None:
    other.routes["/a.png"] = body(PNG)
    ls.routes["/data/upload/a.png"] = status(307, f"http://localhost:{other.port}/a.png")
    p = policy(ls.url, allowed_hosts=frozenset({"127.0.0.1", "localhost"}))
    assert fetch(p, "/data/upload/a.png") == PNG
    assert "Authorization" not in other.requests[0][1]


def test_redirect_to_metadata_address_refused(ls: Server) -> None:
    ls.routes["/data/upload/a.png"] = status(301, "http://169.254.169.254/latest/meta-data/")
    result = fetch(policy(ls.url), "/data/upload/a.png")
    assert isinstance(result, MediaError) and "169.254.169.254" in str(result)


def test_too_many_redirects(ls: Server) -> None:
    ls.routes["/loop"] = status(302, "/loop")
    result = fetch(policy(ls.url), "/loop")
    assert isinstance(result, MediaError) and "more than 3 redirects" in str(result)
    assert len(ls.requests) == 4


def test_redirect_to_login_page_explained(ls: Server) -> None:
    ls.routes["/data/upload/a.png"] = status(302, "/user/login/?next=/data/upload/a.png")
    result = fetch(policy(ls.url), "/data/upload/a.png")
    assert isinstance(result, MediaError) and "LABEL_STUDIO_API_KEY" in str(result)


# ---- sizes and pixels ----------------------------------------------------------------------


def test_oversize_with_content_length_refused(ls: Server) -> None:
    ls.routes["/data/upload/big.png"] = body(b"x" * 5000)
    result = fetch(policy(ls.url, max_bytes=1000), "/data/upload/big.png")
    assert isinstance(result, MediaError)
    assert "5000 bytes is over the limit of 1000 bytes (DPAL_MAX_IMAGE_BYTES)" in str(result)


def test_oversize_without_content_length_aborted_while_streaming(ls: Server) -> None:
    ls.routes["/data/upload/big.png"] = body(b"x" * 200_000, length=False)
    result = fetch(policy(ls.url, max_bytes=1000), "/data/upload/big.png")
    assert isinstance(result, MediaError)
    assert "download aborted past 1000 bytes" in str(result)


def test_body_at_the_limit_accepted(ls: Server) -> None:
    ls.routes["/data/upload/a.png"] = body(PNG, length=False)
    assert fetch(policy(ls.url, max_bytes=len(PNG)), "/data/upload/a.png") == PNG


def test_pixel_bomb_refused(ls: Server) -> None:
    ls.routes["/data/upload/big.png"] = body(png(200, 200))
    fetcher = MediaFetcher(policy(ls.url, max_pixels=100 * 100))
    (result,) = fetcher.fetch_images_sync(["/data/upload/big.png"])
    assert isinstance(result, ImageError)
    assert "200x200 pixels, over the limit of 10000 pixels" in str(result)


def test_data_uri_decoded_locally_and_capped() -> None:
    uri = "data:image/png;base64," + base64.b64encode(PNG).decode()
    assert fetch(policy(), uri, transport=refusing_transport()) == PNG
    result = fetch(policy(max_bytes=10), uri, transport=refusing_transport())
    assert isinstance(result, MediaError) and "over the limit of 10 bytes" in str(result)
    assert len(str(result)) < 200  # the payload is not echoed


# ---- errors from Label Studio --------------------------------------------------------------


@pytest.mark.parametrize("code", [401, 403])
def test_auth_failure_mentions_the_variable_not_the_key(ls: Server, code: int) -> None:
    ls.routes["/data/upload/a.png"] = status(code)
    result = fetch(policy(ls.url), "/data/upload/a.png")
    assert isinstance(result, MediaError)
    assert f"HTTP {code}" in str(result)
    assert "LABEL_STUDIO_API_KEY" in str(result)
    assert KEY not in str(result) and KEY not in repr(result)


def test_missing_key_says_so(ls: Server) -> None:
    ls.routes["/data/upload/a.png"] = status(401)
    result = fetch(policy(ls.url, api_key=None), "/data/upload/a.png")
    assert isinstance(result, MediaError) and "LABEL_STUDIO_API_KEY is not set" in str(result)
    assert "Authorization" not in ls.requests[0][1]


def test_not_found_and_html(ls: Server) -> None:
    ls.routes["/data/upload/page.png"] = body(b"<html>login</html>", content_type="text/html; charset=utf-8")
    result = fetch(policy(ls.url), "/data/upload/missing.png")
    assert isinstance(result, MediaError) and "Label Studio answered HTTP 404" in str(result)
    result = fetch(policy(ls.url), "/data/upload/page.png")
    assert isinstance(result, MediaError) and "HTML page" in str(result)


def test_timeout(ls: Server) -> None:
    ls.routes["/data/upload/slow.png"] = slow(2.0)
    result = fetch(policy(ls.url, timeout_s=0.3), "/data/upload/slow.png")
    assert isinstance(result, MediaError) and "timed out after 0.3 s" in str(result)


def test_connection_refused_is_a_media_error() -> None:
    server = Server()
    url = server.url
    server.close()
    result = fetch(policy(url), "/data/upload/a.png")
    assert isinstance(result, MediaError) and "download failed" in str(result)


def test_policy_repr_hides_key() -> None:
    assert KEY not in repr(policy())


# ---- local files ---------------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (root / "img").mkdir(parents=True)
    (root / "img" / "a.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(png(4, 4))
    os.symlink(tmp_path / "secret.png", root / "escape.png")
    os.symlink(tmp_path, root / "escape_dir")
    os.symlink(root / "img" / "a.png", root / "inside.png")
    return root


@pytest.mark.parametrize("d", ["img/a.png", "img%2Fa.png", "./img/a.png", "inside.png", "img//a.png"])
def test_local_file_inside_root(root: Path, d: str) -> None:
    p = policy(local_files_root=root)
    assert fetch(p, f"/data/local-files/?d={d}", transport=refusing_transport()) == PNG


@pytest.mark.parametrize(
    ("d", "reason"),
    [
        ("../secret.png", "'..'"),
        ("img/../../secret.png", "'..'"),
        ("img%2F..%2F..%2Fsecret.png", "'..'"),
        ("..%5Csecret.png", "'..'"),
        ("/etc/passwd", "absolute"),
        ("%2Fetc%2Fpasswd", "absolute"),
        ("escape.png", "outside LOCAL_FILES_DOCUMENT_ROOT"),
        ("escape_dir/secret.png", "outside LOCAL_FILES_DOCUMENT_ROOT"),
        ("img", "not a regular file"),
        ("img/missing.png", "no such file"),
        ("", "without a ?d= path"),
    ],
)
def test_local_file_escapes_refused(root: Path, d: str, reason: str) -> None:
    result = fetch(policy(local_files_root=root), f"/data/local-files/?d={d}", transport=refusing_transport())
    assert isinstance(result, MediaError), result
    assert reason in str(result)


def test_local_file_absolute_path_of_a_real_file_refused(root: Path) -> None:
    target = root / "img" / "a.png"
    result = fetch(
        policy(local_files_root=root), f"/data/local-files/?d={target}", transport=refusing_transport()
    )
    assert isinstance(result, MediaError) and "absolute" in str(result)


def test_local_file_size_capped(root: Path) -> None:
    result = fetch(policy(local_files_root=root, max_bytes=10), "/data/local-files/?d=img/a.png")
    assert isinstance(result, MediaError) and "over the limit of 10 bytes" in str(result)


def test_local_files_without_root_go_through_label_studio(ls: Server) -> None:
    ls.routes["/data/local-files/"] = body(PNG)
    assert fetch(policy(ls.url), "/data/local-files/?d=img/a.png") == PNG
    path, headers = ls.requests[0]
    assert path == "/data/local-files/?d=img/a.png"
    assert headers["Authorization"] == f"Token {KEY}"


# ---- cloud storage through the presign endpoint --------------------------------------------


def presign_transport(target: str, seen: list[httpx.Request]) -> httpx.MockTransport:
    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "ls.test":
            return httpx.Response(303, headers={"Location": target})
        return httpx.Response(200, content=PNG)

    return httpx.MockTransport(handler)


def test_presign_with_task_id(monkeypatch: pytest.MonkeyPatch) -> None:
    async def public(host: str, port: int) -> list[str]:
        assert host == "bucket.s3.amazonaws.com"
        return ["52.216.0.1", "2600:1f18::1"]

    monkeypatch.setattr(media, "resolve_host", public)
    seen: list[httpx.Request] = []
    target = "https://bucket.s3.amazonaws.com/key.png?X-Amz-Signature=abc"
    result = fetch(policy(), "s3://bucket/key.png", task_id=42, transport=presign_transport(target, seen))
    assert result == PNG
    first, second = seen
    assert first.url.path == "/tasks/42/presign/"
    fileuri = parse_qs(first.url.query.decode())["fileuri"][0]
    assert base64.urlsafe_b64decode(fileuri).decode() == "s3://bucket/key.png"
    assert first.headers["authorization"] == f"Token {KEY}"
    assert second.url.host == "bucket.s3.amazonaws.com"
    assert "authorization" not in second.headers


@pytest.mark.parametrize(
    ("target", "addresses", "reason"),
    [
        ("http://bucket.s3.amazonaws.com/k.png", ["52.216.0.1"], "https only"),
        ("https://internal.corp/k.png", ["10.0.0.7"], "non-public address"),
        ("https://mixed.example/k.png", ["52.216.0.1", "127.0.0.1"], "non-public address"),
        ("https://[::ffff:10.0.0.1]/k.png", [], "non-public address"),
        ("https://169.254.169.254/k.png", [], "non-public address"),
        ("https://u:p@bucket.example/k.png", ["52.216.0.1"], "no user info"),
    ],
)
def test_presign_redirect_refused(
    monkeypatch: pytest.MonkeyPatch, target: str, addresses: list[str], reason: str
) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return addresses

    monkeypatch.setattr(media, "resolve_host", resolve)
    seen: list[httpx.Request] = []
    result = fetch(policy(), "gs://bucket/k.png", task_id=1, transport=presign_transport(target, seen))
    assert isinstance(result, MediaError), result
    assert reason in str(result)
    assert len(seen) == 1  # only the presign call went out


def test_presign_to_allow_listed_host_needs_no_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never(host: str, port: int) -> list[str]:
        raise AssertionError("an allow-listed host is not resolved")

    monkeypatch.setattr(media, "resolve_host", never)
    seen: list[httpx.Request] = []
    p = policy(allowed_hosts=frozenset({"ls.test", "minio.internal"}))
    result = fetch(
        p, "s3://b/k.png", task_id=3, transport=presign_transport("https://minio.internal/b/k.png", seen)
    )
    assert result == PNG


def test_presign_proxy_mode_on_real_server(ls: Server) -> None:
    # Storage without pre-signed URLs: Label Studio streams the file itself.
    ls.routes["/tasks/9/presign/"] = body(PNG)
    assert fetch(policy(ls.url), "azure-blob://container/k.png", task_id=9) == PNG
    path, headers = ls.requests[0]
    assert path.startswith("/tasks/9/presign/?fileuri=")
    assert headers["Authorization"] == f"Token {KEY}"


# ---- batches -------------------------------------------------------------------------------


def test_fetch_images_one_entry_per_url_in_order(ls: Server) -> None:
    ls.routes["/data/upload/a.png"] = body(png(5, 5))
    ls.routes["/data/upload/b.png"] = body(png(7, 3))
    ls.routes["/data/upload/bad.png"] = body(b"not an image")
    urls = [
        "/data/upload/a.png",
        "http://evil.example/x.png",
        "/data/upload/b.png",
        "/data/upload/missing.png",
        "/data/upload/bad.png",
        "/data/upload/a.png",
    ]
    fetcher = MediaFetcher(policy(ls.url))

    async def run():
        try:
            return await fetcher.fetch_images(urls, concurrency=3)
        finally:
            await fetcher.aclose()

    results = asyncio.run(run())
    assert len(results) == len(urls)
    assert isinstance(results[0], Image.Image) and results[0].size == (5, 5)
    assert isinstance(results[1], MediaError) and "evil.example" in str(results[1])
    assert isinstance(results[2], Image.Image) and results[2].size == (7, 3)
    assert isinstance(results[3], MediaError) and "404" in str(results[3])
    assert isinstance(results[4], ImageError)
    assert isinstance(results[5], Image.Image) and results[5].mode == "RGB"


def test_fetch_images_sync_with_task_ids(ls: Server) -> None:
    ls.routes["/data/upload/a.png"] = body(PNG)
    ls.routes["/tasks/5/presign/"] = body(png(3, 3))
    fetcher = MediaFetcher(policy(ls.url))
    results = fetcher.fetch_images_sync(["/data/upload/a.png", "s3://b/k.png", "s3://b/k.png"], [1, 5, None])
    assert all(isinstance(r, Image.Image) for r in results[:2])
    assert results[1].size == (3, 3)
    assert isinstance(results[2], MediaError) and "task id" in str(results[2])
    # A second call runs in a new event loop and still works.
    assert isinstance(fetcher.fetch_images_sync(["/data/upload/a.png"])[0], Image.Image)
    with pytest.raises(ValueError, match="task_ids has 1 entries for 2 urls"):
        fetcher.fetch_images_sync(["/a", "/b"], [1])


def test_concurrency_is_bounded() -> None:
    in_flight = 0
    peak = 0

    async def handler(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200, content=PNG)

    fetcher = MediaFetcher(policy(), transport=httpx.MockTransport(handler))
    results = fetcher.fetch_images_sync([f"/data/upload/{i}.png" for i in range(8)], concurrency=2)
    assert all(isinstance(r, Image.Image) for r in results)
    assert peak == 2


# ---- personal access tokens (JWT refresh tokens) -------------------------------------------


def _jwt(claims: dict) -> str:
    def part(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJl"


def test_personal_access_token_exchanged_once_and_sent_as_bearer() -> None:
    refresh = _jwt({"token_type": "refresh", "exp": time.time() + 3600})
    access = _jwt({"token_type": "access", "exp": time.time() + 300})
    calls: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if request.url.path == "/api/token/refresh/":
            assert json.loads(request.content) == {"refresh": refresh}
            return httpx.Response(200, json={"access": access})
        assert request.headers["authorization"] == f"Bearer {access}"
        return httpx.Response(200, content=PNG)

    fetcher = MediaFetcher(policy(api_key=refresh), transport=httpx.MockTransport(handler))
    results = fetcher.fetch_images_sync(["/data/upload/a.png"] * 4, concurrency=4)
    assert all(isinstance(r, Image.Image) for r in results)
    assert [c.url.path for c in calls].count("/api/token/refresh/") == 1


def test_personal_access_token_refused() -> None:
    refresh = _jwt({"token_type": "refresh", "exp": time.time() + 3600})

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, json={"detail": "Token is invalid"})

    result = fetch(policy(api_key=refresh), "/data/upload/a.png", transport=httpx.MockTransport(handler))
    assert isinstance(result, MediaError)
    assert "LABEL_STUDIO_API_KEY" in str(result) and refresh not in str(result)


def test_policy_from_settings(tmp_path: Path) -> None:
    from backend.settings import Settings

    s = Settings.from_env(
        {
            "LABEL_STUDIO_URL": "https://ls.example.com",
            "LABEL_STUDIO_API_KEY": KEY,
            "DPAL_ALLOWED_HOSTS": "cdn.example.com",
            "DPAL_MAX_IMAGE_BYTES": "1234",
            "DPAL_MAX_IMAGE_PIXELS": "5678",
            "LOCAL_FILES_DOCUMENT_ROOT": str(tmp_path),
        }
    )
    p = FetchPolicy.from_settings(s, timeout_s=7.5)
    assert p.label_studio_url == "https://ls.example.com" and p.api_key == KEY
    assert p.allowed_hosts == {"ls.example.com", "cdn.example.com"}
    assert (p.max_bytes, p.max_pixels, p.timeout_s) == (1234, 5678, 7.5)
    assert p.local_files_root == tmp_path.resolve()
