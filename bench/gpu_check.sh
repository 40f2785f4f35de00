#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one CUDA GPU (about 6 minutes on an H100/H200):
#   1. training / bare-step / feature images/s of the four 512-pixel nets at their own batch sizes,
#   2. the same for the RAM nets at a large batch (what the hardware can do),
#   3. the CUDA tests (tests/test_gpu.py: GPU against CPU, scripts on cuda),
#   4. the large-batch run again with torch.compile.
# Each benchmark writes its table into BENCHMARKS.md.  OUT (default: bench/out) receives the logs
# and a copy of BENCHMARKS.md after every step, so that a run cut short keeps what it measured.
#
#   bash bench/gpu_check.sh            # PY=python3 by default; PY=.venv/bin/python to choose
#   TESTS=0 bash bench/gpu_check.sh    # benchmarks only (skips step 3)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
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

step bench_512 150 $PY bench/bench_train.py --steps 20 \
  --configs c_512_5x5_32_ram,c_512_4x4_32_ram,c_512_5x5_32,c_512_4x4_32
step bench_large_batch 100 $PY bench/bench_train.py --steps 20 --batch_size 128 \
  --test_batch_size 512 --configs c_512_5x5_32_ram,c_512_4x4_32_ram --section 'batch 128'
if [ "${TESTS:-1}" != 0 ]; then
  step tests 200 $PY -m pytest -q -p no:cacheprovider tests/test_gpu.py
fi
step bench_compiled 150 $PY bench/bench_train.py --steps 20 --batch_size 128 \
  --test_batch_size 512 --configs c_512_5x5_32_ram --compile --section 'batch 128, compiled'
exit $status
