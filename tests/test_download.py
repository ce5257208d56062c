"""A failed download says why: the host name that does not resolve, the connection refused, the
HTTP status, the server that does not answer, the bytes that fail the checksum.

Nothing here leaves the machine: the mirror is a server on 127.0.0.1 (or a port with nothing
behind it), proxies are switched off, and name resolution answers only for loopback names: any
other name fails as it does without a network, before a DNS query is sent.
"""

from __future__ import annotations

import hashlib
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from fmnist_lightning import sources
from fmnist_lightning.errors import DataError
from fmnist_lightning.sources import FILES, SYSTEM_DATA_DIR, locate
from tests.helpers import free_port

LOOPBACK = ("127.0.0.1", "localhost", "::1")
TRAIN_IMAGES = f"{FILES['train_images'].name}.gz"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No proxy, no name but loopback's resolves, no system copy, and a short timeout."""
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host, *args, **kwargs):  # type: ignore[no-untyped-def]
        if host not in LOOPBACK:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real_getaddrinfo(host, *args, **kwargs)

    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(sources, "SYSTEM_DATA_DIR", tmp_path / "no-system-copy")
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT_S", 1.0)


class Mirror(ThreadingHTTPServer):
    """A mirror on 127.0.0.1 that answers each file name with a status and a body (404 otherwise)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), MirrorHandler)
        self.files: dict[str, tuple[int, bytes]] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


class MirrorHandler(BaseHTTPRequestHandler):
    server: Mirror

    def do_GET(self) -> None:
        status, body = self.server.files.get(self.path.lstrip("/"), (404, b""))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    server = Mirror()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(sources, "MIRROR", server.url)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def _download_error(tmp_path: Path) -> str:
    with pytest.raises(DataError) as caught:
        locate(tmp_path / "data", offline=False)
    message = str(caught.value)
    assert "\n" not in message and f"the download of {TRAIN_IMAGES} failed: " in message, message
    return message


def test_an_unresolvable_host_name_says_no_network_or_dns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sources, "MIRROR", "http://nonexistent.invalid/")
    message = _download_error(tmp_path)
    assert "cannot resolve the host name nonexistent.invalid (no network, or DNS failed: Name or service" in message


def test_a_refused_connection_names_the_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    monkeypatch.setattr(sources, "MIRROR", f"http://127.0.0.1:{port}/")
    assert f"127.0.0.1:{port} refused the connection" in _download_error(tmp_path)


def test_an_http_status_is_given_with_the_url(mirror: Mirror, tmp_path: Path) -> None:
    assert f"{mirror.url}{TRAIN_IMAGES} answered HTTP 404 Not Found" in _download_error(tmp_path)
    mirror.files[TRAIN_IMAGES] = (503, b"")
    assert f"{mirror.url}{TRAIN_IMAGES} answered HTTP 503 Service Unavailable" in _download_error(tmp_path)


def test_a_server_that_does_not_answer_is_a_timeout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as silent:  # connections complete in the kernel's backlog; nothing ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        monkeypatch.setattr(sources, "MIRROR", f"http://127.0.0.1:{port}/")
        assert f"127.0.0.1:{port} did not answer within 1 s" in _download_error(tmp_path)


def test_wrong_bytes_fail_the_checksum_and_are_not_kept(mirror: Mirror, tmp_path: Path) -> None:
    mirror.files[TRAIN_IMAGES] = (200, b"<html>a captive portal</html>")
    message = _download_error(tmp_path)
    digest = hashlib.md5(b"<html>a captive portal</html>").hexdigest()
    expected = FILES["train_images"].gz_md5
    assert f"sent 29 bytes that fail the checksum (md5 {digest[:12]}..., expected {expected[:12]}...)" in message
    assert not any((tmp_path / "data").rglob("*.gz*"))  # nothing half-checked is left to be found later


def test_a_good_mirror_fills_torchvisions_layout(
    real_data: None, mirror: Mirror, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The way through: every archive checked, written whole, found where torchvision keeps them.
    (Debian's archives are re-compressed, so their md5 stands in for the official one here.)"""
    for key, spec in FILES.items():
        body = (SYSTEM_DATA_DIR / f"{spec.name}.gz").read_bytes()
        mirror.files[f"{spec.name}.gz"] = (200, body)
        monkeypatch.setitem(
            FILES, key, spec.__class__(spec.name, hashlib.md5(body).hexdigest(), spec.sha256, spec.size)
        )
    found, source = locate(tmp_path / "data", offline=False)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    assert source == f"downloaded into {tmp_path / 'data'}"
    assert found == {key: raw / f"{spec.name}.gz" for key, spec in FILES.items()}
    assert sorted(p.name for p in raw.iterdir()) == sorted(f"{spec.name}.gz" for spec in FILES.values())


def test_fit_without_network_or_data_says_why_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cli) -> None:
    """The report: `fmnist fit` said 'the download failed (Error downloading train-images-idx3-ubyte.gz:)'."""
    monkeypatch.setattr(sources, "MIRROR", "http://nonexistent.invalid/")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("fit", "--data-dir", tmp_path / "data", "--max-epochs", "1")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1 and lines[0].startswith("error: Fashion-MNIST not found"), err
    assert f"the download of {TRAIN_IMAGES} failed: cannot resolve the host name nonexistent.invalid" in lines[0]
