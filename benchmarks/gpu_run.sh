#!/usr/bin/env bash
# The GPU checks and figures of docs/benchmarks.md ("On a GPU"), in one call of
# about eight minutes on one GPU, with nothing but PyTorch installed (no Ray, no
# MLflow). Each part has its own time limit, so one that hangs or fails leaves
# the others their time; full logs go to $OUT (default /tmp/dsu-gpu-run).
#
#     OUT=DIR bash benchmarks/gpu_run.sh
#
# 1. the CUDA tests (tests/test_cuda.py and the older CUDA cases);
# 2. stage throughput at 32 px (rgb32) and 64 px (shapes64): ours in fp32 and
#    bf16 against the straightforward baseline, medians of 5 windows of 20
#    steps, peak GPU memory, the kernels' share of the wall time, TFLOP/s,
#    and our step at batch 256;
# 3. the quick preset end to end on the GPU in fp32 and in bf16 (training,
#    distillation, oracles, evaluation): do the swaps still work in bf16?
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dsu-gpu-run}
mkdir -p "$OUT"
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nproc; } \
  2>&1 | tee "$OUT/env.txt"
echo "== tests"
timeout 110 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
  tests/test_classifier_lenc_distill.py::test_stages_and_distill_run_on_cuda \
  tests/test_inference.py::test_cuda_matches_cpu > "$OUT/tests.txt" 2>&1
echo "tests exit $?"; tail -25 "$OUT/tests.txt"
echo "== throughput"
timeout 230 $PY benchmarks/stage_throughput.py --device cuda --configs rgb32,shapes64 \
  --precisions fp32,bf16 --steps 20 --repeats 5 --stat median --large-batch 256 \
  2>&1 | tee "$OUT/throughput.txt"
echo "== quick preset on the GPU"
for p in fp32 bf16; do
  timeout 95 $PY benchmarks/quality.py --config quick --threads 8 --cache /tmp/dsu-oracles \
    --out "/tmp/dsu-quick-$p" device=cuda precision=$p > "$OUT/quality-$p.txt" 2>&1
  echo "quality $p exit $?"
  grep -E "^quality:|training wall|^oracles|swap_acc_|preserve_|leak_excess_mean|^summary|Error" \
    "$OUT/quality-$p.txt"
done
