"""Test setup: one thread (2 busy cores make torch's OpenMP crawl), no hub, repo on sys.path."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

torch.set_num_threads(1)

#: True in the second run of the suite against A1111 1.10's pins (tests/run.sh).
A1111_PINS = os.environ.get("NEGIP_A1111_PINS") == "1"


def reference_library(name: str, attribute: str | None = None):
    """Import a reference library (diffusers, transformers) for an equivalence test.

    In the A1111-pins run some references cannot import beside the old pins (diffusers needs a
    newer safetensors): there the test is skipped with the reason. In the normal run a missing
    reference is an error, never a skip.
    """
    import importlib

    def load():
        module = importlib.import_module(name)
        if attribute is not None:
            getattr(module, attribute)  # lazy packages fail only here
        return module

    if not A1111_PINS:
        return load()
    import pytest

    try:
        return load()
    except Exception as error:
        pytest.skip(f"{name} does not import beside A1111's pins: {error}")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """Every test starts from the same global random state, whatever ran before it."""
    torch.manual_seed(0)


@pytest.fixture
def world(tmp_path):
    """A fresh stand-in A1111 (tests/webui_harness.World) with the tiny models for one test;
    the extension is shut down and the callbacks cleared afterwards."""
    from webui_harness import World, script_callbacks

    from lib_negip.webui import register

    world = World(tmp_path / "models")
    yield world
    register.shutdown()
    script_callbacks.clear()
