#!/usr/bin/env bash
# Every GPU figure issue 14 targets, in one go, for a machine with one CUDA GPU.  The steps run
# in this order of importance, each within what is left of BUDGET seconds (default 540, so
# that one 10-minute device call holds the whole script); a step with under 30 s left is
# skipped, listed at the end, and makes the exit status 1:
#   1. c_512_5x5_32_ram at the config's batch of 32, compiled (train_nn.py's default on a GPU):
#      target >= 6,000 img/s, pipeline overhead <= 10%;
#   2. the CUDA tests of the paths no GPU has run yet (CUDA graphs against plain compiled,
#      the pinned prefetching host cache);
#   3. step 1 with CUDA graphs (train_nn.py --cuda_graphs);
#   4. batch 128, compiled, features at 1,024 per batch: targets >= 15,000 img/s training and
#      >= 30,000 img/s features;
#   5. the other CUDA tests (tests/test_gpu.py: GPU against CPU, bf16 channels_last
#      augmentation, the compiled default of train_nn.py and transform.py, TTA from a host
#      cache, no host sync);
#   6. host-cache batches, the earlier path against the pinned prefetching one
#      (bench/bench_gather.py);
#   7. step 1 with the uint8 cache on the host (a cache too large for the GPU);
#   8. step 4 eager (--no_compile), for the compiled/eager ratio;
#   9. with ALL=1 only: the other three 512-pixel nets at their own batch sizes (compiled).
# bench_train.py interleaves bare step, pipeline and features round by round and reports medians.
# Each benchmark writes its table into BENCHMARKS.md.  OUT (default: bench/out) receives the logs
# and a copy of BENCHMARKS.md after every step, so that a run cut short keeps what it measured.
#
#   bash bench/gpu_check.sh            # PY=python3 by default; PY=.venv/bin/python to choose
#   TESTS=0 bash bench/gpu_check.sh    # benchmarks only (skips steps 2 and 5)
#   BUDGET=900 ALL=1 bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/out}
BUDGET=${BUDGET:-540}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
status=0
skipped=()

step() {  # step NAME SECONDS COMMAND...: run within min(SECONDS, what is left), log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 30 ]; then
    skipped+=("$name")
    status=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most $limit s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v '^\s*$' | tail -n 25
  local rc=${PIPESTATUS[0]}
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || status=1
  cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' \
  | tee -a "$OUT/gpu.txt"

bench=($PY bench/bench_train.py --steps 20 --rounds 3 --configs c_512_5x5_32_ram)
new_paths='host_cache or cuda_graphs'
step target_batch_32 150 "${bench[@]}" --section 'issue 14, batch 32, compiled'
if [ "${TESTS:-1}" != 0 ]; then
  step tests_new_paths 150 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "$new_paths"
fi
step graphs_batch_32 150 "${bench[@]}" --cuda_graphs --section 'issue 14, batch 32, CUDA graphs'
step target_batch_128 150 "${bench[@]}" --batch_size 128 --test_batch_size 1024 \
  --section 'issue 14, batch 128, compiled'
if [ "${TESTS:-1}" != 0 ]; then
  step tests 180 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py -k "not ($new_paths)"
fi
step gather 90 $PY bench/bench_gather.py --device cuda --rounds 5
step host_cache_batch_32 120 "${bench[@]}" --cache host --section 'issue 14, batch 32, host cache'
step eager_batch_128 60 "${bench[@]}" --batch_size 128 --test_batch_size 1024 --no_compile \
  --section 'issue 14, batch 128, eager'
if [ "${ALL:-0}" = 1 ]; then
  step bench_512 150 $PY bench/bench_train.py --steps 10 --rounds 3 \
    --configs c_512_4x4_32_ram,c_512_5x5_32,c_512_4x4_32 --section 'issue 14, 512 px, compiled'
fi
[ ${#skipped[@]} -gt 0 ] && echo "skipped (BUDGET=$BUDGET s spent): ${skipped[*]}" | tee "$OUT/skipped.txt"
exit $status
