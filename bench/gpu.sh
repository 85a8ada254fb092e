#!/usr/bin/env bash
# The GPU run (in the repository root, with the .whl folder beside it; see docs/performance.md):
#   bash bench/gpu.sh            -> $OUT/gpu.json (batch 1) and $OUT/gpu-batch2.json (or
#                                   bench/results/ without $OUT; BATCH2=0 skips batch 2),
#                                   then the GPU tests (bench/gpu_tests.py; TESTS=0 skips them)
# The machine has python3 + torch (CUDA) + safetensors + numpy + einops; ldm
# (stable-diffusion-sdkit) and pytest are unpacked from .whl/, Pillow is stood in for.
# Extra arguments go to bench.run (e.g. --families sdxl, --rounds 40, --tiny). A dry run of
# this script on a CPU (tiny SD1.5 only, about 90 s): PATH=.venv/bin:$PATH DEVICE=cpu DTYPE=float32 \
#   NEGIP_TEST_DEVICE=cpu bash bench/gpu.sh --tiny --rounds 2 --stages step --families sd15
set -u
OUT_DIR=${OUT:-bench/results}
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
git rev-parse --short HEAD 2>/dev/null || true
# Batch 1 (2 UNet rows: what most users run) with every table; then batch 2 (4 rows), only
# against SDPA (what A1111 installs on a GPU) and with a shorter budget, to bound the call.
# SDXL first: at 1024 px it is where the users are, so a time limit would cut SD1.5, not it.
bench() {
  python3 -m bench.run --device "${DEVICE:-cuda}" --dtype "${DTYPE:-float16}" --quick \
    --ldm-wheel-dir .whl --families sdxl,sd15 "$@"
}
bench --batch 1 --time-limit-s "${LIMIT:-240}" --out "$OUT_DIR/gpu.json" "$@"
bench_status=$?
echo "bench.run (batch 1) exit status: $bench_status"
if [ "${BATCH2:-1}" != 0 ]; then
  bench --batch 2 --baselines sdpa --budget-s 30 --time-limit-s "${LIMIT2:-170}" \
    --out "$OUT_DIR/gpu-batch2.json" "$@"
  batch2_status=$?
  echo "bench.run (batch 2) exit status: $batch2_status"
  [ "$batch2_status" = 0 ] || bench_status=$batch2_status
fi
if [ "${TESTS:-1}" != 0 ]; then
  echo "## GPU tests"
  timeout "${TESTS_LIMIT:-120}" python3 -m bench.gpu_tests .whl
  echo "GPU tests exit status: $?"
fi
exit "$bench_status"
