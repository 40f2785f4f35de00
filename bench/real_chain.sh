#!/usr/bin/env bash
# The real-photograph chain on every source we have (issue 32): EyePACS (eyepacs256), ODIR-5K
# and the raw EyePACS eyes that eyepacs256 does not hold, converted to 128 and 256 px with the
# cross-camera look, trained 128 -> 256 px with --hold_out 0.15 (a patient rule: every source's
# test patients stay out), on the CPU or a GPU.  Every step skips what is done and the
# trainings continue with --resume, so the script is simply run again after an interruption
# (it outlasts one sitting on a CPU: about 40 s an epoch at 128 px on 2 cores, alone).
#
#   ODIR=/path/to/Ocular-Disease-Recognition WORK=data/real2 bash bench/real_chain.sh
#   STAGE=prepare|128|256 (default: all three in turn); EPOCHS256 (default 60) compresses the
#   256-px schedule as gpu_chain.sh does; DEVICE (default auto); FROM128 (default the 128-px
#   run's weights_final.pt): the weights the 256-px stage starts from, e.g. multi-128
#   (the released 201-epoch net, by name) on a machine without the 128-px run.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PY:-$REPO/.venv/bin/python}
SHARED=${SHARED:-$REPO/../shared/data}
ODIR=${ODIR:?set ODIR to a clone or bare snapshot of MinsuChae/Ocular-Disease-Recognition}
WORK=${WORK:-data/real2}
STAGE=${STAGE:-all}
EPOCHS256=${EPOCHS256:-60}
DEVICE=${DEVICE:-auto}
FROM128=${FROM128:-weights/c_128_5x5_32_ram/weights_final.pt}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
export PYTHONPATH=$REPO PYTHONUNBUFFERED=1

prepare() {
  [ -f "$WORK/odir/trainLabels.csv" ] || $PY -m retina.datasets odir "$ODIR" "$WORK/odir" --no_progress
  [ -f "$WORK/raw1024/trainLabels.csv" ] || $PY -m retina.datasets eyepacs "$SHARED/eyepacs_raw1024" \
      "$WORK/raw1024" --exclude "$SHARED/eyepacs256/trainLabels.csv" --no_progress
  for size in 128 256; do
    for src in "$SHARED/eyepacs256/train" "$WORK/odir/train" "$WORK/raw1024/train"; do
      $PY convert.py --directory "$src" --convert_directory "$WORK/e$size" --crop_size $size \
        --extension jpeg --enhance local_contrast --no_progress 2>>"$WORK/convert_warnings.log"
    done
  done
  if [ ! -f "$WORK/labels.csv" ]; then
    $PY - "$SHARED/eyepacs256/trainLabels.csv" "$WORK/odir/trainLabels.csv" \
        "$WORK/raw1024/trainLabels.csv" "$WORK/labels.csv" <<'EOF'
import csv, sys
from retina.data.labels import patient_and_eye
rows = []
for path in sys.argv[1:-1]:
    for row in csv.DictReader(open(path)):
        patient, eye = patient_and_eye(row['image'])
        rows.append([row['image'], row['level'], row.get('patient', patient),
                     row.get('eye', eye), row.get('source', 'eyepacs256')])
assert len({r[0] for r in rows}) == len(rows), 'a name in two sources'
with open(sys.argv[-1], 'w') as f:
    f.write('image,level,patient,eye,source\n')
    f.writelines(','.join(r) + '\n' for r in rows)
print(f'{sys.argv[-1]}: {len(rows)} photographs')
EOF
  fi
}

train() {  # CNF FOLDER [args for a new run...]
  local cnf=$1 folder=$2
  shift 2
  cd "$WORK"
  if [ -f "weights/$cnf/weights_final.pt" ]; then
    echo "$cnf: done (weights/$cnf/weights_final.pt)"
  elif [ -f "weights/$cnf/last.pt" ]; then
    $PY "$REPO/train_nn.py" --cnf "$cnf" --resume --no_progress --device "$DEVICE"
  else
    $PY "$REPO/train_nn.py" --cnf "$cnf" --train_dir "$folder" --labels labels.csv \
      --hold_out 0.15 --no_progress --device "$DEVICE" "$@"
  fi
  cd "$REPO"
}

case $STAGE in prepare|all) prepare ;; esac
case $STAGE in 128|all) train c_128_5x5_32_ram e128 >> "$WORK/train128.log" 2>&1 ;; esac
case $STAGE in 256|all)
  train c_256_5x5_32_ram e256 --weights_from "$FROM128" \
    --schedule "0:0.001,$((EPOCHS256 * 3 / 4)):0.0001,$EPOCHS256:stop" >> "$WORK/train256.log" 2>&1 ;;
esac
