#!/usr/bin/env bash
# The GPU run, for the device tool (run in the repository root, with .whl carried):
#   bash bench/gpu.sh            -> $OUT/gpu.json (or bench/results/gpu.json without $OUT),
#                                   then the GPU tests (bench/gpu_tests.py; TESTS=0 skips them)
# The machine has python3 + torch (CUDA) + safetensors + numpy + einops; ldm
# (stable-diffusion-sdkit) and pytest are unpacked from .whl/, Pillow is stood in for.
# Extra arguments go to bench.run (e.g. --families sdxl, --rounds 40, --tiny).
set -u
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
git rev-parse --short HEAD 2>/dev/null || true
python3 -m bench.run --device cuda --dtype float16 --quick --ldm-wheel-dir .whl \
  --time-limit-s "${LIMIT:-400}" --out "$OUT_DIR/gpu.json" "$@"
bench_status=$?
echo "bench.run exit status: $bench_status"
if [ "${TESTS:-1}" != 0 ]; then
  echo "## GPU tests"
  timeout "${TESTS_LIMIT:-120}" python3 -m bench.gpu_tests .whl
  echo "GPU tests exit status: $?"
fi
exit "$bench_status"
