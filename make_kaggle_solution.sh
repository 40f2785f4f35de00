#!/usr/bin/env bash
# Reproduce the Kaggle DR 2nd-place submission end to end, with the RAM nets and heat maps added.
# Needs data/train/*.jpeg, data/test/*.jpeg and data/trainLabels.csv (see data/README.md).
# Run it again after an interruption and it goes on where it stopped: convert.py skips finished
# images, a finished net (weights_final.pt) is not trained again and an interrupted one is
# continued with --resume, transform.py continues from its last save (every 5 iterations).
#   PYTHON=python3 ./make_kaggle_solution.sh     # the interpreter [default: .venv/bin/python]
#   TTA=10 ./make_kaggle_solution.sh             # TTA iterations [default: 50, as the original]
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
TTA=${TTA:-50}

train() {  # train CNF [OPTIONS...]: skipped once finished, continued after an interruption
  local cnf=$1
  shift
  if [ -f "weights/$cnf/weights_final.pt" ]; then
    echo "$cnf: already trained (weights/$cnf/weights_final.pt)"
  elif [ -f "weights/$cnf/last.pt" ]; then
    $PY train_nn.py --cnf "configs/$cnf.py" --resume
  else
    $PY train_nn.py --cnf "configs/$cnf.py" "$@"
  fi
}

# 1. Crop to the eye and resize: 512 px from the photographs, 256 and 128 from the 512s.
$PY convert.py --directory data/train --convert_directory data/train_medium --crop_size 512
$PY convert.py --directory data/test --convert_directory data/test_medium --crop_size 512
for split in train test; do
  $PY convert.py --directory data/${split}_medium --convert_directory data/${split}_small --crop_size 256
  $PY convert.py --directory data/${split}_medium --convert_directory data/${split}_tiny --crop_size 128
done

# 2. Train each net at 128, then 256 and 512 starting from the smaller net's final weights.
for variant in 5x5_32 4x4_32 5x5_32_ram 4x4_32_ram; do
  train c_128_${variant}
  train c_256_${variant} --weights_from weights/c_128_${variant}/weights_final.pt
  train c_512_${variant} --weights_from weights/c_256_${variant}/weights_final.pt
done

# 3. Test-time-augmented features: best-kappa weights of both 512 nets, and the 4x4 net's
#    final weights on other augmentations (--skip keeps the file names apart).
for cnf in c_512_5x5_32 c_512_4x4_32 c_512_5x5_32_ram c_512_4x4_32_ram; do
  $PY transform.py --cnf configs/${cnf}.py --train --test --n_iter "$TTA"
done
$PY transform.py --cnf configs/c_512_4x4_32.py --train --test --n_iter "$TTA" --skip "$TTA" \
    --weights_from weights/c_512_4x4_32/weights_final.pt

# 4. Blend per patient (runs of blend.yml): validation kappa and confusion matrices with fixed
#    and fitted cut-offs, then the submission with the fitted ones.  blend.yml names the
#    50-iteration features; with another TTA a copy naming those is written to data/.
BLEND=blend.yml
if [ "$TTA" != 50 ]; then
  BLEND=data/blend_tta${TTA}.yml
  sed -e "s/_iter_50_skip_50/_iter_${TTA}_skip_${TTA}/" -e "s/_iter_50_skip_0/_iter_${TTA}_skip_0/" \
    blend.yml > "$BLEND"
fi
$PY blend.py --per_patient --blend_cnf "$BLEND" --optimize_thresholds --n_iter 5 --predict \
    --test_dir data/test_medium

# 5. Regression activation maps of the RAM nets (128 and 256 px like the paper, and 512 px).
for cnf in c_128_5x5_32_ram c_256_5x5_32_ram c_512_5x5_32_ram; do
  $PY ram.py --cnf configs/${cnf}.py --limit 200
done
echo "done: the submission is the newest data/sub_*.csv; heat maps are in data/ram/"
