"""The GPU tests on a machine without pip or network: ``python3 -m bench.gpu_tests [WHEEL_DIR]``.

Runs ``pytest -m gpu tests/test_gpu.py`` (half precision against float32, weight 0 bit-exact,
no synchronisation per layer, both forms of the image term) on the device machine, whose
Python has torch but neither pytest nor ``ldm``. Pure-python wheels in ``WHEEL_DIR`` (default
``.whl``) whose packages are missing are unpacked into a temporary folder on ``sys.path``, as
``bench.run --ldm-wheel-dir`` does; Pillow and omegaconf get the same empty stand-ins. Fill
the folder here with

    .venv/bin/pip download --no-deps -d .whl --python-version 3.12 --only-binary=:all: \\
        stable-diffusion-sdkit==2.1.5 pytest pluggy iniconfig packaging pygments

``bench/gpu.sh`` runs this after the benchmark. The exit status is pytest's (5: no test ran,
e.g. no GPU).
"""

from __future__ import annotations

import sys

from bench import env


def main() -> int:
    wheel_dir = sys.argv[1] if len(sys.argv) > 1 else ".whl"
    env.add_wheels(wheel_dir)
    env.ensure_pillow_importable()
    env.ensure_omegaconf_importable()
    missing = env.require("GPU tests", "pytest", "ldm")
    if missing:
        print(f"[gpu-tests] {missing}", flush=True)
        return 2
    import pytest

    arguments = ["-m", "gpu", "tests/test_gpu.py", "-q", "-p", "no:cacheprovider", "-rs"]
    return int(pytest.main(arguments))


if __name__ == "__main__":
    sys.exit(main())
