"""lib_negip.download: official files, atomic downloads and clear failures, on a loopback server."""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import save, save_file
from tiny_adapters import make_adapter_state_dict
from tiny_encoders import TINY_H, hf_vision_config, hf_vision_state_dict

from lib_negip import download
from lib_negip.download import (
    HF_BASE_URL,
    OFFICIAL_MODELS,
    VIT_BIGG_ENCODER,
    VIT_H_ENCODER,
    DownloadError,
    a1111_fetch,
    download_official,
    missing_official_for,
)
from lib_negip.errors import ArgumentError, ModelFileError
from lib_negip.registry import ModelRegistry, is_skipped_name

PREFIX = "/h94/IP-Adapter/resolve/main"


class _Handler(BaseHTTPRequestHandler):
    """Serves ``server.routes``: path -> (mode, body); mode "ok", "cut" (announces the whole
    body, sends half of it, then closes the connection) or an HTTP status code."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.server.requests.append(self.path)  # type: ignore[attr-defined]
        mode, body = self.server.routes.get(self.path, (404, b"Not Found"))  # type: ignore[attr-defined]
        if isinstance(mode, int):
            self.send_response(mode)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if mode == "cut":
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:  # keep the test output clean
        pass


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch) -> None:
    # urllib honours proxy variables; the loopback server must be reached directly.
    for name in (
        "http_proxy",
        "HTTP_PROXY",
        "https_proxy",
        "HTTPS_PROXY",
        "all_proxy",
        "ALL_PROXY",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def server() -> Iterator[ThreadingHTTPServer]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    httpd.routes = {}  # type: ignore[attr-defined]
    httpd.requests = []  # type: ignore[attr-defined]
    httpd.base_url = f"http://127.0.0.1:{httpd.server_address[1]}{PREFIX}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def serve(server, repo_path: str, body: bytes, mode: str | int = "ok") -> None:
    server.routes[f"{PREFIX}/{repo_path}"] = (mode, body)


def adapter_bytes(**kw) -> bytes:
    sd = make_adapter_state_dict("base", encoder_dim=32, layer_inner_dims=(16, 32), **kw)
    return save(sd)


def encoder_bytes() -> tuple[bytes, bytes]:
    return save(hf_vision_state_dict(**TINY_H)), json.dumps(hf_vision_config(**TINY_H)).encode()


def all_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def a1111_style_load_file_from_url(calls: list[dict]):
    """Mirrors A1111 1.10's ``modules.modelloader.load_file_from_url`` (torch.hub's downloader,
    which streams into its own ``.partial`` file and renames it)."""

    def load_file_from_url(url, *, model_dir, progress=True, file_name=None, hash_prefix=None):
        from torch.hub import download_url_to_file

        calls.append({"url": url, "model_dir": model_dir, "file_name": file_name})
        os.makedirs(model_dir, exist_ok=True)
        cached_file = os.path.abspath(os.path.join(model_dir, file_name))
        if not os.path.exists(cached_file):
            download_url_to_file(url, cached_file, progress=False, hash_prefix=hash_prefix)
        return cached_file

    return load_file_from_url


# --- the table -----------------------------------------------------------------------------


def test_official_table() -> None:
    adapters = {n: m for n, m in OFFICIAL_MODELS.items() if m.kind == "adapter"}
    assert sorted(adapters) == sorted(
        [
            "ip-adapter_sd15",
            "ip-adapter_sd15_light",
            "ip-adapter_sd15_vit-G",
            "ip-adapter-plus_sd15",
            "ip-adapter-plus-face_sd15",
            "ip-adapter-full-face_sd15",
            "ip-adapter_sdxl",
            "ip-adapter_sdxl_vit-h",
            "ip-adapter-plus_sdxl_vit-h",
            "ip-adapter-plus-face_sdxl_vit-h",
        ]
    )
    for name, model in adapters.items():
        folder = "sdxl_models" if "sdxl" in name else "models"
        assert model.weights.url() == f"{HF_BASE_URL}/{folder}/{name}.safetensors"
        assert model.weights.target == f"{name}.safetensors"
        assert model.folder == "ipadapter"
        needs_bigg = name in ("ip-adapter_sd15_vit-G", "ip-adapter_sdxl")
        assert model.encoder == (VIT_BIGG_ENCODER if needs_bigg else VIT_H_ENCODER)
    assert HF_BASE_URL == "https://huggingface.co/h94/IP-Adapter/resolve/main"
    vit_h, bigg = OFFICIAL_MODELS[VIT_H_ENCODER], OFFICIAL_MODELS[VIT_BIGG_ENCODER]
    assert (vit_h.architecture, bigg.architecture) == ("ViT-H-14", "ViT-bigG-14")
    assert [f.repo_path for f in vit_h.files] == [
        "models/image_encoder/config.json",
        "models/image_encoder/model.safetensors",
    ]
    assert [f.target for f in bigg.files] == [
        f"{VIT_BIGG_ENCODER}/config.json",
        f"{VIT_BIGG_ENCODER}/model.safetensors",
    ]
    assert bigg.source_folder == "sdxl_models/image_encoder"
    assert bigg.folder == "clip_vision"
    assert download.official_encoder_for("ViT-bigG-14") == VIT_BIGG_ENCODER
    assert download.official_encoder_for("ViT-w64-L4-p14") is None
    assert download.official_encoder_for(None) is None
    assert download.encoder_for_official("ip-adapter_sd15.safetensors") is vit_h
    # Names as infotext and the API give them.
    for name in ("ip-adapter_sd15", "IP-Adapter_SD15.safetensors", "ip-adapter_sd15 [0123456789]"):
        assert download.is_official(name)
    assert not download.is_official("my-adapter")
    assert not download.is_official("../ip-adapter_sd15")


def test_official_encoder_for_an_adapter_spec() -> None:
    from tiny_adapters import PUBLISHED_SHAPES

    from lib_negip.adapter import detect_adapter

    expected = {
        "ip-adapter_sd15": VIT_H_ENCODER,
        "ip-adapter_sd15_vit-G": VIT_BIGG_ENCODER,
        "ip-adapter_sdxl": VIT_BIGG_ENCODER,
        "ip-adapter-plus_sdxl_vit-h": VIT_H_ENCODER,
        "ip-adapter-full-face_sd15": VIT_H_ENCODER,
    }
    for name, encoder in expected.items():
        spec = detect_adapter(PUBLISHED_SHAPES[name]())
        assert download.official_encoder_for(spec) == encoder, name
        assert OFFICIAL_MODELS[name].encoder == encoder, name
    tiny = detect_adapter(make_adapter_state_dict("base", encoder_dim=32))
    assert download.official_encoder_for(tiny) is None


def test_unknown_names_are_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ArgumentError, match="ip-adapter_sd15_light") as info:
        download_official("ip-adapter_faceid", tmp_path, fetch=lambda u, d: None)
    assert "not an official" in str(info.value)
    with pytest.raises(ArgumentError):
        download.encoder_for_official(VIT_H_ENCODER)  # an encoder, not an adapter
    assert list(tmp_path.iterdir()) == []


def test_missing_official_for(tmp_path: Path) -> None:
    missing = missing_official_for("ip-adapter_sdxl", tmp_path)
    assert [f.target for f in missing] == [
        f"{VIT_BIGG_ENCODER}/config.json",
        f"{VIT_BIGG_ENCODER}/model.safetensors",
    ]
    folder = tmp_path / "clip_vision" / VIT_BIGG_ENCODER
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"x")
    (folder / "config.json").write_bytes(b"")  # empty: still missing
    assert [f.target for f in missing_official_for("ip-adapter_sdxl", tmp_path)] == [
        f"{VIT_BIGG_ENCODER}/config.json"
    ]


# --- downloads -----------------------------------------------------------------------------


def test_adapter_download_lands_under_its_final_name(server, tmp_path: Path) -> None:
    body = adapter_bytes()
    serve(server, "models/ip-adapter_sd15.safetensors", body)
    target = tmp_path / "models" / "ipadapter"
    path = download_official("ip-adapter_sd15", target.parent, base_url=server.base_url)
    assert path == target / "ip-adapter_sd15.safetensors"
    assert path.read_bytes() == body
    assert all_files(target) == ["ip-adapter_sd15.safetensors"]  # no temporary file left
    (entry,) = ModelRegistry([target], []).adapters()
    assert entry.name == "ip-adapter_sd15"
    assert entry.spec.variant == "base"
    # Present files are kept: no second request.
    requests = len(server.requests)
    assert download_official("ip-adapter_sd15", target.parent, base_url=server.base_url) == path
    assert len(server.requests) == requests


def test_encoder_download_makes_a_folder_with_its_config(server, tmp_path: Path) -> None:
    weights, config = encoder_bytes()
    serve(server, "models/image_encoder/model.safetensors", weights)
    serve(server, "models/image_encoder/config.json", config)
    clip_vision = tmp_path / "models" / "clip_vision"
    assert len(missing_official_for("ip-adapter-plus_sd15", clip_vision.parent)) == 2
    path = download_official(VIT_H_ENCODER, clip_vision.parent, base_url=server.base_url)
    assert path == clip_vision / VIT_H_ENCODER / "model.safetensors"
    assert all_files(clip_vision) == [
        f"{VIT_H_ENCODER}/config.json",
        f"{VIT_H_ENCODER}/model.safetensors",
    ]
    assert server.requests == [
        f"{PREFIX}/models/image_encoder/config.json",  # config first, weights last
        f"{PREFIX}/models/image_encoder/model.safetensors",
    ]
    assert missing_official_for("ip-adapter-plus_sd15", clip_vision.parent) == []
    (entry,) = ModelRegistry([], [clip_vision]).encoders()
    assert entry.name == VIT_H_ENCODER
    assert entry.spec.heads == TINY_H["heads"]  # read from the downloaded config.json


def test_http_404(server, tmp_path: Path) -> None:
    with pytest.raises(DownloadError) as info:
        download_official("ip-adapter_sd15_light", tmp_path / "ip", base_url=server.base_url)
    message = str(info.value)
    assert "HTTP 404" in message
    assert "models/ipadapter/ip-adapter_sd15_light.safetensors" in message
    assert "models/ip-adapter_sd15_light.safetensors" in message  # the URL tried
    assert str(tmp_path) not in message
    assert all_files(tmp_path) == []
    assert isinstance(info.value, ModelFileError)


def test_connection_cut_mid_body_leaves_nothing(server, tmp_path: Path) -> None:
    body = adapter_bytes()
    serve(server, "models/ip-adapter_sd15.safetensors", body, "cut")
    target = tmp_path / "models" / "ipadapter"
    with pytest.raises(
        DownloadError, match=rf"connection closed after {len(body) // 2} of {len(body)} bytes"
    ):
        download_official("ip-adapter_sd15", target.parent, base_url=server.base_url)
    assert all_files(tmp_path) == []
    assert ModelRegistry([target], []).adapters() == []


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"", "empty file"),
        (b"<!DOCTYPE html><html><body>Sign in</body></html>", "web page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "LFS pointer"),
        (b"\xff" * 64, "not a complete safetensors"),
        ("cut-at-source", "truncated"),  # complete HTTP answer of a truncated file
    ],
    ids=["empty", "html", "lfs", "garbage", "truncated"],
)
def test_damaged_safetensors_is_refused(server, tmp_path: Path, body, reason: str) -> None:
    if body == "cut-at-source":
        whole = adapter_bytes()
        body = whole[: len(whole) - 100]
    serve(server, "sdxl_models/ip-adapter_sdxl.safetensors", body)
    with pytest.raises(DownloadError, match=reason):
        download_official("ip-adapter_sdxl", tmp_path / "ip", base_url=server.base_url)
    assert all_files(tmp_path) == []


def test_broken_config_stops_the_encoder_download(server, tmp_path: Path) -> None:
    weights, _ = encoder_bytes()
    serve(server, "sdxl_models/image_encoder/config.json", b'{"hidden_size": 16')
    serve(server, "sdxl_models/image_encoder/model.safetensors", weights)
    with pytest.raises(DownloadError, match="not valid JSON"):
        download_official(VIT_BIGG_ENCODER, tmp_path, base_url=server.base_url)
    assert all_files(tmp_path) == []
    assert len(server.requests) == 1  # the weights were not fetched


def test_a1111_downloader_is_used_through_fetch(server, tmp_path: Path) -> None:
    body = adapter_bytes()
    serve(server, "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors", body)
    calls: list[dict] = []
    fetch = a1111_fetch(a1111_style_load_file_from_url(calls))
    target = tmp_path / "models" / "ipadapter"
    path = download_official(
        "ip-adapter-plus_sdxl_vit-h", target.parent, fetch=fetch, base_url=server.base_url
    )
    assert path.read_bytes() == body
    assert all_files(target) == ["ip-adapter-plus_sdxl_vit-h.safetensors"]
    (call,) = calls
    assert call["url"] == f"{server.base_url}/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
    assert Path(call["model_dir"]) == target
    # A1111's downloader writes to a temporary name that the registry never lists.
    assert is_skipped_name(call["file_name"])
    assert call["file_name"] != path.name


def test_a1111_downloader_cut_mid_body_leaves_nothing(server, tmp_path: Path) -> None:
    serve(server, "models/ip-adapter_sd15.safetensors", adapter_bytes(), "cut")
    fetch = a1111_fetch(a1111_style_load_file_from_url([]))
    target = tmp_path / "models" / "ipadapter"
    with pytest.raises(DownloadError, match="ip-adapter_sd15"):
        download_official("ip-adapter_sd15", target.parent, fetch=fetch, base_url=server.base_url)
    assert all_files(tmp_path) == []  # neither our temporary file nor torch.hub's .partial
    assert ModelRegistry([target], []).adapters() == []


def test_nothing_is_listed_while_a_download_runs(tmp_path: Path) -> None:
    target = tmp_path / "models" / "ipadapter"
    reg = ModelRegistry([target], [])
    seen: list[list[str]] = []

    def fetch(url: str, destination: Path) -> None:
        destination.write_bytes(adapter_bytes())  # complete, valid, but not renamed yet
        reg.refresh()
        seen.append([e.name for e in reg.adapters()])

    download_official("ip-adapter_sd15", target.parent, fetch=fetch)
    assert seen == [[]]
    reg.refresh()
    assert [e.name for e in reg.adapters()] == ["ip-adapter_sd15"]


def test_disk_full_and_interrupts_clean_up(tmp_path: Path) -> None:
    def disk_full(url: str, destination: Path) -> None:
        destination.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device", str(destination))

    with pytest.raises(DownloadError, match="disk is full") as info:
        download_official("ip-adapter_sd15", tmp_path, fetch=disk_full)
    assert str(tmp_path) not in str(info.value)
    assert all_files(tmp_path) == []

    def interrupted(url: str, destination: Path) -> None:
        destination.write_bytes(b"partial")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        download_official("ip-adapter_sd15", tmp_path, fetch=interrupted)
    assert all_files(tmp_path) == []

    with pytest.raises(DownloadError, match="without writing the file"):
        download_official("ip-adapter_sd15", tmp_path, fetch=lambda url, destination: None)


def test_announced_size_beyond_free_space_is_refused_early(
    server, tmp_path: Path, monkeypatch
) -> None:
    serve(server, "models/ip-adapter_sd15.safetensors", adapter_bytes())
    monkeypatch.setattr(download.shutil, "disk_usage", lambda p: SimpleNamespace(free=10))
    with pytest.raises(DownloadError, match="disk is full"):
        download_official("ip-adapter_sd15", tmp_path, base_url=server.base_url)
    assert all_files(tmp_path) == []


def test_unreachable_server(tmp_path: Path) -> None:
    # A port nothing listens on (bound, then closed), on loopback.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match="could not connect"):
        download_official("ip-adapter_sd15", tmp_path, base_url=f"http://127.0.0.1:{port}")
    assert all_files(tmp_path) == []


def test_a_failed_encoder_download_leaves_no_empty_folder(tmp_path: Path) -> None:
    """The encoder's folder was made before the first file was fetched and stayed, empty,
    after the download failed ("Nothing was saved")."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    clip_vision = tmp_path / "clip_vision"
    (clip_vision / "other").mkdir(parents=True)
    with pytest.raises(DownloadError, match="could not connect"):
        download_official(VIT_H_ENCODER, tmp_path, base_url=f"http://127.0.0.1:{port}")
    assert sorted(p.name for p in clip_vision.iterdir()) == ["other"]
    # A folder that was there before stays, even when it is empty.
    (clip_vision / VIT_H_ENCODER).mkdir()
    with pytest.raises(DownloadError, match="could not connect"):
        download_official(VIT_H_ENCODER, tmp_path, base_url=f"http://127.0.0.1:{port}")
    assert (clip_vision / VIT_H_ENCODER).is_dir()


def test_existing_file_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "models" / "ipadapter"
    target.mkdir(parents=True)
    save_file(
        make_adapter_state_dict("base", layer_inner_dims=(16,)),
        str(target / "ip-adapter_sd15.safetensors"),
    )

    def never(url: str, destination: Path) -> None:
        raise AssertionError("downloaded again")

    assert download_official("ip-adapter_sd15", target.parent, fetch=never).is_file()
