"""The second run of the suite really runs against A1111 1.10.1's pins (tests/run.sh)."""

from __future__ import annotations

import importlib.metadata

import pytest
from conftest import A1111_PINS

PINS = {"open-clip-torch": "2.20.0", "numpy": "1.26.2", "pillow": "9.5.0", "safetensors": "0.4.2"}


@pytest.mark.skipif(not A1111_PINS, reason="only in the A1111-pins run of tests/run.sh")
@pytest.mark.parametrize(("package", "version"), PINS.items())
def test_pinned_version_is_the_one_imported(package: str, version: str) -> None:
    module = {"open-clip-torch": "open_clip", "pillow": "PIL"}.get(package, package)
    imported = __import__(module)
    assert importlib.metadata.version(package) == version
    if hasattr(imported, "__version__"):
        assert imported.__version__ == version
