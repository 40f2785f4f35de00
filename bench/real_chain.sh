#!/usr/bin/env bash
# The real-photograph chain on every source we have (issue 32): EyePACS (eyepacs256), ODIR-5K
# and the raw EyePACS eyes that eyepacs256 does not hold, converted to 128 and 256 px with the
# cross-camera look, trained 128 -> 256 px with --hold_out 0.15 (a patient rule: every source's
# test patients stay out), on the CPU or a GPU.  Every step skips what is done and the
# trainings continue with --resume, so the script is simply run again after an interruption
# (it outlasts one sitting on a CPU: about 40 s an epoch at 128 px on 2 cores, alone).
#
#   ODIR=/path/to/Ocular-Disease-Recognition WORK=data/real2 bash bench/real_chain.sh
#   STAGE=prepare|128|256|blend (default: the first three in turn); EPOCHS256 (default 60)
#   compresses the 256-px schedule as gpu_chain.sh does; DEVICE (default auto); FROM128 (default
#   the 128-px run's weights_final.pt): the weights the 256-px stage starts from, e.g. multi-128
#   (the released 201-epoch net, by name) on a machine without the 128-px run.
#   STAGE=blend: the test split's links (t128/, t256/), both nets' mean features over VIEWS
#   (default 20) TTA views in bf16 (transform.py), and the per-patient blend fitted on all
#   training patients (blend.py; it prints its held-out kappa; WORK/blend/sub_all_blend.pt is
#   what `python -m retina.release NAME --chain ... --blend` releases).  NET128 / NET256
#   (default: the runs' weights.pt) name the nets, e.g. NET128=multi-128; CNF256 (default
#   c_256_5x5_32_ram) the 256-px net's config; BLEND (default blend/sub_all.csv) where blend.py
#   writes (its fitted blend beside it, ..._blend.pt).
#   STAGE=256jpeg / 128jpeg: a net fine-tuned to grade a photograph and its JPEG copies alike
#   (configs/c_{256,128}_5x5_32_ram_jpeg.py: 7 epochs from FROM256 / FROM128J, default the
#   256-px run's weights.pt / models/multi-128.pt; the released multi-256-jpeg started from
#   multi-256: `git show 5282236:models/multi-256.pt`; about 4.5 / 1.5 min an epoch); then
#   STAGE=blend CNF256=c_256_5x5_32_ram_jpeg NET256=weights/c_256_5x5_32_ram_jpeg/weights_final.pt
#   [CNF128=c_128_5x5_32_ram_jpeg NET128=weights/c_128_5x5_32_ram_jpeg/weights_final.pt]
#   BLEND=blend/sub_jpeg.csv.
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
VIEWS=${VIEWS:-20}
NET128=${NET128:-weights/c_128_5x5_32_ram/weights.pt}
NET256=${NET256:-weights/c_256_5x5_32_ram/weights.pt}
CNF256=${CNF256:-c_256_5x5_32_ram}
BLEND=${BLEND:-blend/sub_all.csv}
FROM256=${FROM256:-weights/c_256_5x5_32_ram/weights.pt}
FROM128J=${FROM128J:-$REPO/models/multi-128.pt}
CNF128=${CNF128:-c_128_5x5_32_ram}
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

blend() {
  cd "$WORK"
  $PY - <<'EOF'
import csv, os, shutil
from retina.data.labels import held_out
for size in (128, 256):  # the test split's photographs, linked, with their conversion record
    folder = f't{size}'
    os.makedirs(folder, exist_ok=True)
    for row in csv.DictReader(open('labels.csv')):
        link = f'{folder}/{row["image"]}.jpeg'
        if held_out(row['image'], 0.15) and not os.path.lexists(link):
            os.symlink(f'../e{size}/{row["image"]}.jpeg', link)
    shutil.copy(f'e{size}/conversion.json', folder)
EOF
  $PY "$REPO/transform.py" --cnf "$CNF128" --weights_from "$NET128" --train --test \
    --n_iter "$VIEWS" --precision bf16 --no_progress --train_dir e128 --test_dir t128
  $PY "$REPO/transform.py" --cnf "$CNF256" --weights_from "$NET256" --train --test \
    --n_iter "$VIEWS" --precision bf16 --no_progress --train_dir e256 --test_dir t256
  mkdir -p "$(dirname "$BLEND")"
  $PY "$REPO/blend.py" --per_patient --predict --optimize_thresholds --fit_on all --n_iter 5 \
    --test_dir t256 --labels labels.csv --no_pictures --output "$BLEND" \
    --features_file data/features/${CNF128}_train_mean_iter_${VIEWS}_skip_0.npy \
    --features_file data/features/${CNF256}_train_mean_iter_${VIEWS}_skip_0.npy
  cd "$REPO"
}

case $STAGE in prepare|all) prepare ;; esac
case $STAGE in 128|all) train c_128_5x5_32_ram e128 >> "$WORK/train128.log" 2>&1 ;; esac
case $STAGE in 256|all)
  train c_256_5x5_32_ram e256 --weights_from "$FROM128" \
    --schedule "0:0.001,$((EPOCHS256 * 3 / 4)):0.0001,$EPOCHS256:stop" >> "$WORK/train256.log" 2>&1 ;;
esac
case $STAGE in 128jpeg)
  train c_128_5x5_32_ram_jpeg e128 --weights_from "$FROM128J" >> "$WORK/train128jpeg.log" 2>&1 ;;
esac
case $STAGE in 256jpeg)
  train c_256_5x5_32_ram_jpeg e256 --weights_from "$FROM256" >> "$WORK/train256jpeg.log" 2>&1 ;;
esac
case $STAGE in blend) blend 2>&1 | tee -a "$WORK/blend.log" ;; esac
