#!/usr/bin/env bash
# The GPU checks and figures of docs/benchmarks.md ("On a GPU") on a machine
# with one GPU and nothing but PyTorch installed (no Ray, no MLflow). Each part
# has its own time limit, so one that hangs or fails leaves the others their
# time; full logs go to $OUT (default /tmp/dsu-gpu-run).
#
#     OUT=DIR PARTS="tests rgb32 shapes64" bash benchmarks/gpu_run.sh
#
# Parts (PARTS, default all of them, about 11 minutes: split them over two
# calls where one call is limited to 10):
#   tests     the CUDA tests (tests/test_cuda.py and the older CUDA cases)      ~1 min
#   rgb32     stage throughput at 32 px: ours in fp32 and bf16 against the     ~2.5 min
#             straightforward baseline, medians of 5 windows of 20 steps, peak
#             GPU memory, the kernels' share of the wall time, TFLOP/s, batch 256
#   shapes64  the same at 64 px                                                 ~3 min
#   ablate    32 px stages 1 and 2 with CUDA graphs, channels-last and cuDNN's  ~1 min
#             autotuner each turned off alone
#   compile   32 px stage 1 with compile: true (the warm-up column is the       ~1.5 min
#             compile time)
#   quick     the quick preset end to end on the GPU in fp32 and bf16           ~2 min
#             (training, distillation, oracles, evaluation)
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=. PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/dsu-gpu-run}
PARTS=${PARTS:-tests rgb32 shapes64 ablate compile quick}
PY=${PY:-python3}
mkdir -p "$OUT"
quiet() { grep -v -i "profiler\|_warn_once"; }
TP="$PY benchmarks/stage_throughput.py --device cuda"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; nproc; } \
  2>&1 | tee "$OUT/env.txt"
for part in $PARTS; do
  echo "== $part"
  case $part in
    tests)
      timeout 110 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
        tests/test_classifier_lenc_distill.py::test_stages_and_distill_run_on_cuda \
        tests/test_inference.py::test_cuda_matches_cpu > "$OUT/tests.txt" 2>&1
      echo "tests exit $?"; tail -15 "$OUT/tests.txt" ;;
    rgb32|shapes64)
      timeout 240 $TP --configs $part --precisions fp32,bf16 --steps 20 --repeats 5 \
        --stat median --large-batch 256 2>&1 | quiet | tee "$OUT/throughput-$part.txt" ;;
    ablate)
      timeout 120 $TP --configs rgb32 --stages stage1,stage2 --no-naive --steps 20 --repeats 5 \
        --stat median --ablate cuda_graphs=false,channels_last=false,cudnn_benchmark=false 2>&1 \
        | quiet | tee "$OUT/ablate.txt" ;;
    compile)
      timeout 120 $TP --configs rgb32 --stages stage1 --precisions fp32,bf16 --compile \
        --no-naive --steps 20 --repeats 3 --stat median 2>&1 | quiet | tee "$OUT/compile.txt" ;;
    quick)
      for p in fp32 bf16; do
        timeout 95 $PY benchmarks/quality.py --config quick --threads 8 --cache /tmp/dsu-oracles \
          --out "/tmp/dsu-quick-$p" device=cuda precision=$p > "$OUT/quality-$p.txt" 2>&1
        echo "quality $p exit $?"
        grep -E "^quality:|training wall|swap_acc_|preserve_|leak_excess_mean|^summary|Error" \
          "$OUT/quality-$p.txt"
      done ;;
    *) echo "unknown part $part" ;;
  esac
done
