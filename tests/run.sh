#!/usr/bin/env bash
# The one test command: sets up .venv on first use (or when a requirements file changed), then
# lints and runs the suite twice: with the pinned test stack, and again with A1111 1.10.1's pins
# of the packages our runtime code uses (open-clip-torch 2.20.0, numpy 1.26.2, Pillow 9.5.0,
# safetensors 0.4.2) first on PYTHONPATH.
#
#   bash tests/run.sh                      # lint, whole suite (real-shape tests too), A1111-pins run
#   NEGIP_SKIP_SLOW=1 bash tests/run.sh    # without the full-size tests (minutes, ~12 GB RAM)
#   bash tests/run.sh -k hijack            # extra arguments go to the first pytest run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv=.venv
python=${PYTHON:-python3.11}
command -v "$python" >/dev/null || python=python3
stamp="$venv/.negip-requirements"
wanted=$(cat tests/requirements*.txt | sha256sum | cut -d' ' -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
    echo "Setting up $venv (torch and torchvision come from this machine's local wheels)..."
    # On x86_64 pip's torch is a CUDA build: the venv takes about 6 GB (5.8 measured). Say so
    # plainly instead of failing half-way with pip's "No space left on device".
    free_mb=$(df -Pm . | awk 'NR == 2 {print $4}')
    if [ ! -x "$venv/bin/python" ] && [ "${free_mb:-0}" -lt 7000 ]; then
        echo "tests/run.sh: setting up $venv needs about 7 GB free on this disk; $free_mb MB are." >&2
        echo "Free some space (or run where there is more) and run it again." >&2
        exit 1
    fi
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r tests/requirements.txt
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps -r tests/requirements-nodeps.txt
    rm -rf "$venv/a1111-pins"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        --target "$venv/a1111-pins" -r tests/requirements-a1111-pins.txt
    echo "$wanted" >"$stamp"
fi

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1

"$venv/bin/ruff" check .
"$venv/bin/ruff" format --check .

markers="not gpu and not webui"
if [ "${NEGIP_SKIP_SLOW:-0}" = 1 ]; then markers="$markers and not slow"; fi

echo "== test suite =="
"$venv/bin/python" -m pytest -m "$markers" "$@"

echo "== engine and glue tests again under A1111 1.10.1's pins =="
PYTHONPATH="$venv/a1111-pins" NEGIP_A1111_PINS=1 \
    "$venv/bin/python" -m pytest -q -m "not slow and not gpu and not webui" tests
