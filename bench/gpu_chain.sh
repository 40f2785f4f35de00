#!/usr/bin/env bash
# The chain on real photographs, unattended: the 128-px RAM net, the 256-px RAM net started from
# its weights (the original's transfer), TTA features of both and the per-patient blends, every
# stage scored on the held-out test patients (bench/bench_chain.py writes the BENCHMARKS.md
# section "Real photographs: the chain on held-out patients").
#
#   DATA=gpu_data bash bench/gpu_chain.sh                 # on one CUDA GPU
#   DATA=gpu_data DEVICE=cpu EPOCHS128=200 EPOCHS256=70 bash bench/gpu_chain.sh   # on a CPU
#
# DATA holds e128/ and e256/ (eyepacs256 converted by convert.py --enhance local_contrast
# --extension jpeg at --crop_size 128 and 256; each with its conversion.json) and
# eyepacs_labels.csv, and optionally raw/ folders to grade across cameras (RAW, default
# "$DATA/eyepacs_raw $DATA/eyepacs_raw1024", each with train/ and trainLabels.csv; skipped when
# absent).  EPOCHS128 and EPOCHS256 compress the configs' schedules (train_nn.py --schedule):
# the learning rate drops tenfold after three quarters of the epochs, as the configs' 150 of
# 200.  A run that is cut off is continued by running the script again (train_nn.py --resume).
# FINE_EPOCHS (default 0: skipped) also trains the fine heat-map net c_128_5x5_32_ram_fine
# (53x53 maps, about ten times the 6x6 net's compute) on e128 and scores its maps and the 6x6
# net's on HEI-MED (HEIMED, default "$DATA/heimed": images/ and masks/) with
# bench/bench_heatmaps.py.  WORK (default /tmp/chain) receives the weights, features and logs; OUT (default bench/out)
# the logs and BENCHMARKS.md (WRITE=0: the table is printed and BENCHMARKS.md left alone).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-python3}
case $PY in */*) PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY") ;; esac  # used from $WORK
DATA=$(cd "${DATA:-gpu_data}" && pwd) || { echo "error: DATA folder ${DATA:-gpu_data} not found" >&2; exit 2; }
WORK=${WORK:-/tmp/chain}
OUT=${OUT:-bench/out}
DEVICE=${DEVICE:-cuda}
EPOCHS128=${EPOCHS128:-200}
EPOCHS256=${EPOCHS256:-100}
FINE_EPOCHS=${FINE_EPOCHS:-0}
HEIMED=${HEIMED:-$DATA/heimed}
TTA=${TTA:-10}
HOLD_OUT=${HOLD_OUT:-0.15}
RAW=${RAW:-"$DATA/eyepacs_raw $DATA/eyepacs_raw1024"}
NOTE=${NOTE:-}
WRITE=${WRITE:-1}  # 0: print the table, leave BENCHMARKS.md alone (tests)
for need in e128 e256 eyepacs_labels.csv; do
  [ -e "$DATA/$need" ] || { echo "error: $DATA/$need missing (see the top of $0)" >&2; exit 2; }
done
mkdir -p "$WORK" "$OUT"
OUT=$(cd "$OUT" && pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1
for need in e128 e256 eyepacs_labels.csv; do ln -sfn "$DATA/$need" "$WORK/$need"; done
if [ "$DEVICE" != cpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi

schedule() {  # EPOCHS [RATE] -> 0:RATE,DROP:RATE/10,EPOCHS:stop (the RAM configs' shape)
  local rate=${2:-0.001}
  echo "0:$rate,$(( $1 * 3 / 4 )):$(awk "BEGIN { print $rate / 10 }"),$1:stop"
}

train() {  # CNF FOLDER EPOCHS RATE [--weights_from FILE]: a new run, or the interrupted one resumed
  local cnf=$1 folder=$2 epochs=$3 rate=$4
  shift 4
  local args=(--cnf "$cnf" --schedule "$(schedule "$epochs" "$rate")" --no_progress --device "$DEVICE")
  if [ -f "$WORK/weights/$cnf/weights_final.pt" ]; then
    echo "$cnf: already trained ($WORK/weights/$cnf/weights_final.pt)"
    return 0
  elif [ -f "$WORK/weights/$cnf/last.pt" ]; then
    args+=(--resume)
  else
    args+=(--train_dir "$folder" --labels eyepacs_labels.csv --hold_out "$HOLD_OUT" "$@")
  fi
  (cd "$WORK" && $PY "$REPO/train_nn.py" "${args[@]}") 2>&1 | tee -a "$OUT/train_$cnf.log" | tail -n 3
  return "${PIPESTATUS[0]}"
}

started=$(date +%s)
train c_128_5x5_32_ram e128 "$EPOCHS128" 0.001 || exit $?
train c_256_5x5_32_ram e256 "$EPOCHS256" 0.001 \
  --weights_from "$WORK/weights/c_128_5x5_32_ram/weights_final.pt" || exit $?
if [ "$FINE_EPOCHS" -gt 0 ]; then  # the fine net's own rate: its config's 0.003
  train c_128_5x5_32_ram_fine e128 "$FINE_EPOCHS" 0.003 || exit $?
fi
raw_args=()
for folder in $RAW; do [ -d "$folder/train" ] && raw_args+=(--raw "$folder"); done
[ ${#raw_args[@]} -eq 0 ] && raw_args=(--raw "$WORK/no_raw")  # none: bench_chain skips it
$PY bench/bench_chain.py --work "$WORK" --labels "$WORK/eyepacs_labels.csv" \
  --net c_128_5x5_32_ram:e128 --net c_256_5x5_32_ram:e256 --tta "$TTA" --hold_out "$HOLD_OUT" \
  "${raw_args[@]}" "$([ "$WRITE" = 0 ] && echo --no_write || echo --write)" --note "Epochs: $EPOCHS128 at 128 px, $EPOCHS256 at 256 px ($DEVICE). $NOTE" \
  2>&1 | tee "$OUT/bench_chain.log" | tail -n 30
status=${PIPESTATUS[0]}
if [ "$FINE_EPOCHS" -gt 0 ] && [ -d "$HEIMED/images" ]; then
  $PY bench/bench_heatmaps.py --work "$WORK/bench_heatmaps" --heimed "$HEIMED" --device "$DEVICE" \
    --real_weights "$WORK/weights/c_128_5x5_32_ram_fine/weights.pt" \
    --real_weights "$WORK/weights/c_128_5x5_32_ram/weights.pt" --layers conv5 \
    "$([ "$WRITE" = 0 ] && echo --no_write || echo --write)" --section 'real-photo fine nets' \
    --note "Trained by bench/gpu_chain.sh: $FINE_EPOCHS epochs (fine), $EPOCHS128 (6x6), $DEVICE." \
    2>&1 | tee "$OUT/bench_heatmaps.log" | tail -n 20
elif [ "$FINE_EPOCHS" -gt 0 ]; then
  echo "note: $HEIMED/images not found: the fine net's maps are not scored"
fi
cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
for cnf in c_128_5x5_32_ram c_256_5x5_32_ram c_128_5x5_32_ram_fine; do
  cp "$WORK/weights/$cnf/log.csv" "$OUT/${cnf}_log.csv" 2>/dev/null
done
echo "gpu_chain.sh: $(( $(date +%s) - started )) s, exit $status"
exit $status
