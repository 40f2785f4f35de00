#!/usr/bin/env bash
# The real-photograph benchmark on one CUDA GPU, unattended (bench/bench_real.py: the 128-px
# RAM and baseline nets on eyepacs256 in both looks, TTA, blend, pixel floor, cross-camera).
#
#   DATA=gpu_data BUDGET=330 bash bench/gpu_real.sh
#
# DATA holds eyepacs128/ (eyepacs256 converted to 128 px by convert.py: train/ with its
# conversion.json, trainLabels.csv) and raw128/ (eyepacs_raw the same way): a GPU machine that
# cannot reach ../shared gets them carried.  EPOCHS (default: what fits in BUDGET seconds of
# training for the four nets, at most the full 200) is measured with a 3-epoch probe first.
# OUT (default bench/out) receives the logs and BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-bench/out}
DATA=${DATA:-gpu_data}
BUDGET=${BUDGET:-330}
WORK=${WORK:-/tmp/real_bench}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name())' | tee -a "$OUT/gpu.txt"

if [ -z "${EPOCHS:-}" ]; then
  probe=$WORK/probe
  mkdir -p "$probe/data"
  cp "$DATA/eyepacs128/trainLabels.csv" "$probe/data/trainLabels.csv"
  (cd "$probe" && $PY "$OLDPWD/train_nn.py" --cnf c_128_5x5_32 --train_dir "$OLDPWD/$DATA/eyepacs128/train" \
     --labels data/trainLabels.csv --max_epochs 3 --no_progress --device "$DEVICE") 2>&1 | tail -n 4 | tee "$OUT/probe.log"
  EPOCHS=$($PY - "$probe/weights/c_128_5x5_32/log.csv" "$BUDGET" <<'PYEOF'
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
per_epoch = min(float(r['seconds']) for r in rows[1:]) + 0.35  # + validation and saving
print(max(10, min(200, int(float(sys.argv[2]) / (4 * per_epoch)))))
PYEOF
)
  echo "epochs per net: $EPOCHS" | tee -a "$OUT/probe.log"
fi
epoch_args=(); [ "$EPOCHS" -lt 200 ] && epoch_args=(--epochs "$EPOCHS")
timeout "${LIMIT:-480}" $PY bench/bench_real.py --source "$DATA/eyepacs128" --raw "$DATA/raw128" \
  --work "$WORK" "${epoch_args[@]}" --tta 10 --device "$DEVICE" \
  --note 'carried to the GPU machine as JPEG quality 92 to fit its transfer limit' 2>&1 \
  | grep -v '^\s*$' | tee "$OUT/bench_real.log" | tail -n 40
status=${PIPESTATUS[0]}
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
for look in none local_contrast; do  # the training logs, and the RAM nets for CPU-side checks
  for c in c_128_5x5_32_ram c_128_5x5_32; do
    log=$WORK/$look/weights/$c/log.csv
    [ -f "$log" ] && { echo "== $look $c"; cat "$log"; } >> "$OUT/train_logs.txt"
  done
  w=$WORK/$look/weights/c_128_5x5_32_ram/weights.pt
  [ -f "$w" ] && cp "$w" "$OUT/${look}_c_128_5x5_32_ram.pt"
done
exit $status
