"""vitedit.hub: verified downloads into the cache, offline mode, the registry, source parsing.

No network: HTTP sources are served by a ThreadingHTTPServer on 127.0.0.1 (port 0) in a daemon
thread, shut down at teardown; hf:// goes through a monkeypatched ``hf_hub_download``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from vitedit import hub
from vitedit.errors import ArtifactError, DownloadError, UsageError

PAYLOAD = bytes(range(256)) * 800  # 200 KiB: several 64 KiB read chunks, so streaming is exercised
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
SIDECAR = json.dumps({"model": {"name": "vit_tiny"}}).encode()
SIDECAR_SHA = hashlib.sha256(SIDECAR).hexdigest()


class _Server:
    """Routes: path -> (status, body, declared Content-Length). Records every request path."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, bytes, int]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.requests.append(self.path)
                status, body, length = server.routes.get(self.path, (404, b"not found", 9))
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.end_headers()
                self.wfile.write(body)  # fewer bytes than declared simulates a dropped connection
                self.wfile.flush()
                self.close_connection = True

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def add(self, path: str, body: bytes, status: int = 200, length: int | None = None) -> str:
        self.routes[path] = (status, body, len(body) if length is None else length)
        return self.url(path)

    def close(self) -> None:
        if not self.thread.is_alive():
            return  # already closed (a test stops the server early)
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server():
    srv = _Server()
    yield srv
    srv.close()


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch) -> Path:
    """Isolated VITEDIT_HOME, online, no proxies, and a fresh per-process verification memo."""
    monkeypatch.setenv("VITEDIT_HOME", str(tmp_path / "home"))
    for var in ("HF_HUB_OFFLINE", "VITEDIT_OFFLINE", "http_proxy", "HTTP_PROXY", "https_proxy",
                "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setattr(hub, "_VERIFIED", set())
    return tmp_path / "home"


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_download_verifies_and_lands_in_content_addressed_cache(server, home):
    url = server.add("/a/hyper.safetensors", PAYLOAD)
    seen = []
    path = hub.fetch_file(hub.RemoteFile(url, PAYLOAD_SHA, "hyper.safetensors"),
                          progress=lambda done, total: seen.append((done, total)))
    assert path == home / "cache" / "artifacts" / PAYLOAD_SHA[:2] / PAYLOAD_SHA / "hyper.safetensors"
    assert path.read_bytes() == PAYLOAD
    assert files_under(home / "cache") == [path]  # no temp file left
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))


def test_second_call_uses_cache_without_request(server):
    remote = hub.RemoteFile(server.add("/h.safetensors", PAYLOAD), PAYLOAD_SHA, "h.safetensors")
    first = hub.fetch_file(remote)
    second = hub.fetch_file(remote)
    hub._VERIFIED.clear()  # a new process re-hashes, still without network
    third = hub.fetch_file(remote)
    assert first == second == third
    assert server.requests == ["/h.safetensors"]


def test_corrupted_download_refused_and_nothing_cached(server, home):
    corrupted = bytearray(PAYLOAD)
    corrupted[100] ^= 0xFF
    url = server.add("/bad.safetensors", bytes(corrupted))
    with pytest.raises(DownloadError) as err:
        hub.fetch_file(hub.RemoteFile(url, PAYLOAD_SHA, "bad.safetensors"))
    message = str(err.value)
    assert err.value.exit_code == 6
    assert PAYLOAD_SHA[:12] in message and hashlib.sha256(corrupted).hexdigest()[:12] in message
    assert url in message and "corrupted or the source changed" in message
    assert files_under(home / "cache") == []


def test_offline_not_cached_then_cached(server, monkeypatch):
    remote = hub.RemoteFile(server.add("/o.safetensors", PAYLOAD), PAYLOAD_SHA, "o.safetensors")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DownloadError, match="not cached") as err:
        hub.fetch_file(remote)
    assert err.value.exit_code == 6 and "without --offline" in str(err.value)
    assert server.requests == []

    path = hub.fetch_file(remote, offline=False)  # explicit argument beats the env var
    hub._VERIFIED.clear()
    assert hub.fetch_file(remote) == path
    assert server.requests == ["/o.safetensors"]


def test_is_offline_env_values(monkeypatch):
    assert hub.is_offline() is False
    for value, expected in [("1", True), ("TRUE", True), ("yes", True), ("on", True), ("0", False), ("", False)]:
        monkeypatch.setenv("VITEDIT_OFFLINE", value)
        assert hub.is_offline() is expected
    assert hub.is_offline(True) is True
    monkeypatch.setenv("VITEDIT_OFFLINE", "1")
    assert hub.is_offline(False) is False


def test_interrupted_download_leaves_no_partial_file(server, home):
    url = server.add("/cut.safetensors", PAYLOAD[: len(PAYLOAD) // 2], length=len(PAYLOAD))
    remote = hub.RemoteFile(url, PAYLOAD_SHA, "cut.safetensors")
    with pytest.raises(DownloadError) as err:
        hub.fetch_file(remote)
    assert err.value.exit_code == 6 and url in str(err.value)
    assert files_under(home / "cache") == []
    # the next attempt downloads afresh instead of using anything left over
    server.add("/cut.safetensors", PAYLOAD)
    assert hub.fetch_file(remote).read_bytes() == PAYLOAD
    assert len(server.requests) == 2


def test_corrupted_cache_file_is_deleted_and_refetched(server, monkeypatch):
    remote = hub.RemoteFile(server.add("/c.safetensors", PAYLOAD), PAYLOAD_SHA, "c.safetensors")
    path = hub.fetch_file(remote)
    path.write_bytes(b"bit rot" + PAYLOAD[7:])  # same size; the memo is keyed on mtime too
    hub._VERIFIED.clear()

    monkeypatch.setenv("VITEDIT_OFFLINE", "1")
    with pytest.raises(DownloadError, match="corrupted"):
        hub.fetch_file(remote)
    assert not path.exists()  # never served again
    monkeypatch.delenv("VITEDIT_OFFLINE")

    assert hub.fetch_file(remote).read_bytes() == PAYLOAD
    assert server.requests == ["/c.safetensors", "/c.safetensors"]


def test_http_404_names_url(server, home):
    url = server.url("/missing.safetensors")
    with pytest.raises(DownloadError) as err:
        hub.fetch_file(hub.RemoteFile(url, PAYLOAD_SHA, "missing.safetensors"))
    assert err.value.exit_code == 6
    assert url in str(err.value) and "404" in str(err.value)
    assert files_under(home / "cache") == []


def test_unreachable_host_is_download_error(server):
    url = server.url("/x.safetensors")
    server.close()  # nothing listens on that port any more
    with pytest.raises(DownloadError, match="check the network") as err:
        hub.fetch_file(hub.RemoteFile(url, PAYLOAD_SHA, "x.safetensors"), timeout=2)
    assert url in str(err.value)


def _write_registry(path: Path, server: _Server) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"version": 1, "artifacts": {"tiny-hypernet": {
        "base_model": "vit_tiny_patch16_224",
        "description": "test entry",
        "files": [
            {"source": server.add("/t/tiny-hypernet.safetensors", PAYLOAD), "sha256": PAYLOAD_SHA,
             "filename": "tiny-hypernet.safetensors"},
            {"source": server.add("/t/tiny-hypernet.json", SIDECAR), "sha256": SIDECAR_SHA,
             "filename": "tiny-hypernet.json"},
        ]}}}))


def test_shipped_registry_is_empty_and_valid(home):
    assert hub.load_registry() == {}
    with pytest.raises(DownloadError, match="registry lists no artifacts yet") as err:
        hub.resolve("fashion-vit-hypernet")
    assert err.value.exit_code == 6


def test_user_registry_merged_and_resolved_side_by_side(server, home):
    _write_registry(home / "registry.json", server)
    registry = hub.load_registry()
    entry = registry["tiny-hypernet"]
    assert entry.base_model == "vit_tiny_patch16_224" and len(entry.files) == 2

    with pytest.raises(DownloadError, match="run `vitedit pull tiny-hypernet`"):
        hub.resolve("tiny-hypernet", offline=True)
    assert server.requests == []

    path = hub.resolve("tiny-hypernet")
    assert path.name == "tiny-hypernet.safetensors" and path.read_bytes() == PAYLOAD
    assert path.with_suffix(".json").read_bytes() == SIDECAR  # sidecar beside the tensor file
    assert hub.resolve("tiny-hypernet") == path
    assert len(server.requests) == 2

    with pytest.raises(DownloadError, match="known names: tiny-hypernet"):
        hub.resolve("no-such-hypernet")


def test_registry_path_argument_and_malformed(tmp_path, server):
    good = tmp_path / "good.json"
    _write_registry(good, server)
    assert set(hub.load_registry(good)) == {"tiny-hypernet"}

    bad_cases = [
        "{not json",
        json.dumps([1, 2]),
        json.dumps({"version": 2, "artifacts": {}}),
        json.dumps({"version": 1, "artifacts": {"x": {"base_model": "m", "files": []}}}),
        json.dumps({"version": 1, "artifacts": {"x": {"base_model": "m", "files": [
            {"source": "ftp://h/x.safetensors", "sha256": PAYLOAD_SHA, "filename": "x.safetensors"}]}}}),
        json.dumps({"version": 1, "artifacts": {"x": {"base_model": "m", "files": [
            {"source": "https://h/x.safetensors", "sha256": "abc", "filename": "x.safetensors"}]}}}),
        json.dumps({"version": 1, "artifacts": {"x": {"base_model": "m", "files": [
            {"source": "https://h/x", "sha256": PAYLOAD_SHA, "filename": "../x.safetensors"}]}}}),
    ]
    for i, text in enumerate(bad_cases):
        bad = tmp_path / f"bad{i}.json"
        bad.write_text(text)
        with pytest.raises(ArtifactError, match="is malformed") as err:
            hub.load_registry(bad)
        assert str(bad) in str(err.value) and err.value.exit_code == 5


def test_resolve_url_requires_sha256_and_local_paths_pass_through(server, tmp_path):
    url = server.add("/u.safetensors", PAYLOAD)
    with pytest.raises(DownloadError, match="--sha256") as err:
        hub.resolve(url)
    assert err.value.exit_code == 6
    with pytest.raises(UsageError, match="--sha256"):
        hub.resolve(url, sha256="not-hex")
    assert server.requests == []

    path = hub.resolve(url, sha256=PAYLOAD_SHA.upper())
    assert path.name == "u.safetensors" and path.read_bytes() == PAYLOAD

    local = tmp_path / "mine.safetensors"
    local.write_bytes(b"x")
    assert hub.resolve(str(local)) == local


def test_file_url_copied_after_verification(tmp_path, home):
    src = tmp_path / "src dir" / "f.safetensors"
    src.parent.mkdir()
    src.write_bytes(PAYLOAD)
    path = hub.resolve(src.as_uri(), sha256=PAYLOAD_SHA)
    assert path.read_bytes() == PAYLOAD and path != src
    with pytest.raises(DownloadError, match="expected"):
        hub.fetch_file(hub.RemoteFile(src.as_uri(), SIDECAR_SHA, "g.safetensors"))
    assert files_under(home / "cache") == [path]


def test_hf_source_parsing_and_verification(tmp_path, monkeypatch, home):
    import huggingface_hub

    blob = tmp_path / "hf-cache" / "file.safetensors"
    blob.parent.mkdir()
    blob.write_bytes(PAYLOAD)
    calls = []

    def fake_download(repo_id, filename, *, revision=None, **kwargs):
        calls.append((repo_id, revision, filename))
        return str(blob)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert hub._parse_hf("hf://owner/repo@rev/sub/file.safetensors") == ("owner/repo", "rev", "sub/file.safetensors")
    assert hub._parse_hf("hf://owner/repo/file.safetensors") == ("owner/repo", None, "file.safetensors")

    path = hub.resolve("hf://owner/repo@rev/sub/file.safetensors", sha256=PAYLOAD_SHA)
    assert calls == [("owner/repo", "rev", "sub/file.safetensors")]
    assert path.read_bytes() == PAYLOAD and path.is_relative_to(home / "cache")

    with pytest.raises(DownloadError, match="corrupted or the source changed") as err:
        hub.fetch_file(hub.RemoteFile("hf://owner/repo@rev/other.safetensors", SIDECAR_SHA, "other.safetensors"))
    assert err.value.exit_code == 6
    assert files_under(home / "cache") == [path]

    with pytest.raises(UsageError, match="hf://owner/repo"):
        hub.RemoteFile("hf://only-owner/file.safetensors", PAYLOAD_SHA, "file.safetensors")


def test_cache_dir_honours_vitedit_home(home, monkeypatch, tmp_path):
    assert hub.cache_dir() == home / "cache" and hub.cache_dir().is_dir()
    assert hub.user_registry_path() == home / "registry.json"
    monkeypatch.delenv("VITEDIT_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert "vitedit" in str(hub.cache_dir())
