"""lib_negip.files: reading state dicts safely, and clear messages for every broken file."""

from __future__ import annotations

import json
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_adapters import make_adapter_state_dict, nest

from lib_negip import files
from lib_negip.errors import ModelFileError
from lib_negip.files import describe_state_dict, load_state_dict, set_torch_load


@pytest.fixture(autouse=True)
def _default_torch_load():
    set_torch_load(None)
    yield
    set_torch_load(None)


@pytest.fixture
def flat() -> dict[str, torch.Tensor]:
    return make_adapter_state_dict("plus", layer_inner_dims=(16, 32))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), key


def save_torch(obj: object, path: Path, legacy: bool) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    # Prove which container was written: current torch writes a zip with ".format_version"
    # (the entry A1111's checker rejects); the legacy format is a bare pickle stream.
    if legacy:
        assert not zipfile.is_zipfile(path)
    else:
        assert any(n.endswith("/.format_version") for n in zipfile.ZipFile(path).namelist())
    return path


def test_safetensors_round_trip(tmp_path: Path, flat: dict[str, torch.Tensor]) -> None:
    flat["image_proj.latents"] = flat["image_proj.latents"].to(torch.bfloat16)
    save_file(flat, str(tmp_path / "a.safetensors"))
    loaded = load_state_dict(tmp_path / "a.safetensors")
    assert_same(loaded, flat)
    assert all(t.device.type == "cpu" for t in loaded.values())


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("nested", [True, False], ids=["nested", "flat"])
def test_bin_round_trip(
    tmp_path: Path, flat: dict[str, torch.Tensor], legacy: bool, nested: bool
) -> None:
    path = save_torch(nest(flat) if nested else flat, tmp_path / "a.bin", legacy)
    assert_same(load_state_dict(path), flat)


def test_bin_and_safetensors_give_the_same_keys(
    tmp_path: Path, flat: dict[str, torch.Tensor]
) -> None:
    save_file(flat, str(tmp_path / "a.safetensors"))
    save_torch(nest(flat), tmp_path / "a.bin", legacy=False)
    from_bin = load_state_dict(tmp_path / "a.bin")
    assert "image_proj.proj_in.weight" in from_bin
    assert "ip_adapter.1.to_k_ip.weight" in from_bin
    assert_same(from_bin, load_state_dict(tmp_path / "a.safetensors"))


@pytest.mark.parametrize("suffix", [".pth", ".pt", ".ckpt", ".BIN"])
def test_other_torch_suffixes(tmp_path: Path, flat: dict[str, torch.Tensor], suffix: str) -> None:
    path = save_torch(flat, tmp_path / f"a{suffix}", legacy=False)
    assert_same(load_state_dict(path), flat)


def test_state_dict_wrapper_and_non_tensor_leaves(
    tmp_path: Path, flat: dict[str, torch.Tensor]
) -> None:
    inner = {**nest(flat), "note": "trained", "scale": 1.5}
    checkpoint = {"state_dict": inner, "global_step": 1000, "epoch": 3}
    path = save_torch(checkpoint, tmp_path / "a.ckpt", legacy=False)
    assert_same(load_state_dict(path), flat)


def test_uses_the_loader_the_host_sets(
    tmp_path: Path, flat: dict[str, torch.Tensor], monkeypatch
) -> None:
    path = save_torch(nest(flat), tmp_path / "a.bin", legacy=False)
    original = torch.load

    def a1111_checker(*args, **kwargs):  # modules/safe.py rejects ".format_version"
        raise Exception(
            "checking file a.bin: The file may be malicious, so the program is not going to read it."
        )

    monkeypatch.setattr(torch, "load", a1111_checker)
    with pytest.raises(ModelFileError, match="could not be read"):
        load_state_dict(path)

    calls: list[dict] = []

    def unsafe_torch_load(*args, **kwargs):
        calls.append(kwargs)
        return original(*args, **kwargs)

    set_torch_load(unsafe_torch_load)
    assert_same(load_state_dict(path), flat)
    assert calls == [{"map_location": "cpu", "weights_only": True}]


class _Payload:
    """Unpickling this creates a marker file: proof of code execution."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_pickled_code_is_refused_and_not_run(tmp_path: Path, legacy: bool) -> None:
    control_marker, marker = tmp_path / "control-ran", tmp_path / "payload-ran"
    control = save_torch(
        {"w": torch.ones(2), "x": _Payload(control_marker)}, tmp_path / "c.bin", legacy
    )
    # The payload is real: an unsafe load runs it.
    torch.load(control, weights_only=False)
    assert control_marker.exists()

    path = save_torch(
        {"image_proj": {"w": torch.ones(2)}, "x": _Payload(marker)}, tmp_path / "evil.bin", legacy
    )
    with pytest.raises(ModelFileError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert str(path) in message
    assert "contains pickled code" in message
    assert "was not loaded" in message
    assert "(it refers to io.open)" in message or "(it refers to builtins.open)" in message
    assert ".safetensors" in message
    assert not marker.exists()


class _Scripted(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1


def test_torchscript_archive_is_refused_before_torch_load(tmp_path: Path) -> None:
    """torch before 2.6 hands a TorchScript zip to torch.jit.load, which ignores weights_only
    and runs its code (A1111 1.10 installs torch 2.1.2): such a file never reaches the loader."""
    path = tmp_path / "ip-adapter_sd15_community.bin"
    torch.jit.save(torch.jit.script(_Scripted()), str(path))
    calls = []
    set_torch_load(lambda *args, **kwargs: calls.append(args))
    with pytest.raises(ModelFileError) as info:
        load_state_dict(path)
    message = str(info.value)
    assert "is a TorchScript archive (it holds code" in message
    assert "was not loaded" in message
    assert ".safetensors" in message
    assert calls == []
    # A state dict's zip goes on to the loader.
    plain = save_torch({"w": torch.ones(2)}, tmp_path / "plain.bin", legacy=False)
    set_torch_load(None)
    assert torch.equal(load_state_dict(plain)["w"], torch.ones(2))


def _header(body: dict | bytes, declared: int | None = None) -> bytes:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", r"is empty \(0 bytes\): the download failed; download the model again"),
        (b"\x01\x02\x03", r"is truncated: 3 bytes, too short for a safetensors header"),
        (
            _header({}, declared=10**6) + b"{}",
            r"corrupt safetensors header: it declares 1000000 header bytes in a file of 12 bytes",
        ),
        (_header(b"{not json"), r"corrupt safetensors header \(JSONDecodeError"),
        (_header(b"[1, 2]"), r"corrupt safetensors header \(TypeError: the header is a JSON list"),
        (
            _header({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}) + b"\0" * 8,
            r"is truncated: its header describes \d+ bytes but the file has \d+ bytes "
            r"\(an interrupted download\?\); download it again",
        ),
        (
            b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n",
            r"is a Git LFS pointer",
        ),
        (b"<!DOCTYPE html><html>Sign in</html>", r"is a web page \(\d+ bytes\), not a model"),
    ],
    ids=[
        "empty",
        "too-short",
        "header-length",
        "bad-json",
        "not-object",
        "truncated-data",
        "lfs",
        "html",
    ],
)
def test_broken_safetensors(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ModelFileError, match=expected) as info:
        load_state_dict(path)
    assert str(path) in str(info.value)


def test_truncated_real_safetensors(tmp_path: Path, flat: dict[str, torch.Tensor]) -> None:
    path = tmp_path / "model.safetensors"
    save_file(flat, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(
        ModelFileError, match=r"is truncated: its header describes (\d+) bytes but the file has"
    ):
        load_state_dict(path)


def test_invalid_entry_inside_a_consistent_header(tmp_path: Path) -> None:
    # Sizes add up but the dtype is nonsense: safetensors itself must refuse, and we wrap it.
    path = tmp_path / "model.safetensors"
    path.write_bytes(
        _header({"w": {"dtype": "NOPE", "shape": [2], "data_offsets": [0, 8]}}) + b"\0" * 8
    )
    with pytest.raises(
        ModelFileError, match=r"could not be read as safetensors .*download it again"
    ):
        load_state_dict(path)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_bin(tmp_path: Path, flat: dict[str, torch.Tensor], legacy: bool) -> None:
    path = save_torch(nest(flat), tmp_path / "model.bin", legacy)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(
        ModelFileError,
        match=r"could not be read as a torch file .*damaged or truncated: download it again",
    ):
        load_state_dict(path)


def test_garbage_bin(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"this is not a pickle at all" * 10)
    with pytest.raises(
        ModelFileError,
        match=r"model.bin (is not a readable torch file|could not be read as a torch file)",
    ):
        load_state_dict(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(
        ModelFileError, match=r"model file .*nope.safetensors does not exist: check the name"
    ):
        load_state_dict(tmp_path / "nope.safetensors")


def test_directory_named_like_a_model(tmp_path: Path) -> None:
    folder = tmp_path / "image_encoder.safetensors"
    folder.mkdir()
    with pytest.raises(
        ModelFileError, match=r"is a folder, not a model file; choose the model file itself"
    ):
        load_state_dict(folder)
    (folder / "model.safetensors").write_bytes(b"x")
    with pytest.raises(
        ModelFileError,
        match=r"is a folder, not a model file; it holds model.safetensors: choose one",
    ):
        load_state_dict(folder)


@pytest.mark.parametrize("name", ["model.onnx", "model.gguf", "model"])
def test_unknown_extension(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\0" * 16)
    with pytest.raises(
        ModelFileError,
        match=r"which this extension does not read; expected one of \.safetensors, \.bin",
    ):
        load_state_dict(path)


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        ({"epoch": 3, "name": "x"}, r"contains no tensors \(found epoch \(int\), name \(str\)\)"),
        ({}, r"contains no tensors \(found an empty dict\)"),
        ([torch.ones(2)], r"holds a list, not a dict of tensors"),
    ],
    ids=["only-metadata", "empty-dict", "list"],
)
def test_no_tensors(tmp_path: Path, obj: object, expected: str) -> None:
    path = save_torch(obj, tmp_path / "model.bin", legacy=False)
    with pytest.raises(ModelFileError, match=expected):
        load_state_dict(path)


def test_describe_state_dict_reports_dtypes() -> None:
    sd = {
        "a.weight": torch.zeros(2, 3, dtype=torch.float16),
        "b": torch.zeros(4, dtype=torch.int64),
    }
    text = describe_state_dict(sd)
    assert text == "2 tensors (float16 x1, int64 x1): a.weight [2, 3], b [4]"
    assert describe_state_dict({}) == "no tensors"
    many = {f"k{i:02d}": torch.zeros(1) for i in range(10)}
    assert describe_state_dict(many, limit=2).endswith("k00 [1], k01 [1], ... (8 more)")


def test_no_work_at_import() -> None:
    assert files._torch_load is None
