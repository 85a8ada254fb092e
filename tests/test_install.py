"""install.py installs only what is missing and honours --skip-install."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

INSTALL = Path(__file__).resolve().parent.parent / "install.py"


def run_installer(monkeypatch: pytest.MonkeyPatch, installed: set[str], skip: bool = False) -> list:
    calls: list[str] = []
    launch = SimpleNamespace(
        args=SimpleNamespace(skip_install=skip),
        is_installed=lambda name: name in installed,
        run_pip=lambda command, desc=None: calls.append(command),
    )
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(INSTALL), run_name="__main__")
    return calls


def test_stock_a1111_needs_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_installer(monkeypatch, {"safetensors", "open_clip"}) == []


def test_missing_package_is_installed_without_a_version_pin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert run_installer(monkeypatch, {"safetensors"}) == ["install open-clip-torch"]


def test_skip_install_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    assert run_installer(monkeypatch, set(), skip=True) == []
