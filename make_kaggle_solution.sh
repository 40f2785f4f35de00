#!/usr/bin/env bash
# Reproduce the Kaggle DR 2nd-place submission end to end, with the RAM nets and heat maps added.
# Needs data/train/*.jpeg, data/test/*.jpeg and data/trainLabels.csv (see data/README.md).
# Every step resumes: convert.py skips finished images, train_nn.py takes --resume after an
# interruption (rerun that line with --resume), transform.py continues from its last save.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
TTA=${TTA:-50}

# 1. Crop to the eye and resize: 512 px from the photographs, 256 and 128 from the 512s.
$PY convert.py --directory data/train --convert_directory data/train_medium --crop_size 512
$PY convert.py --directory data/test --convert_directory data/test_medium --crop_size 512
for split in train test; do
  $PY convert.py --directory data/${split}_medium --convert_directory data/${split}_small --crop_size 256
  $PY convert.py --directory data/${split}_medium --convert_directory data/${split}_tiny --crop_size 128
done

# 2. Train each net at 128, then 256 and 512 starting from the smaller net's final weights.
for variant in 5x5_32 4x4_32 5x5_32_ram 4x4_32_ram; do
  $PY train_nn.py --cnf configs/c_128_${variant}.py
  $PY train_nn.py --cnf configs/c_256_${variant}.py --weights_from weights/c_128_${variant}/weights_final.pt
  $PY train_nn.py --cnf configs/c_512_${variant}.py --weights_from weights/c_256_${variant}/weights_final.pt
done

# 3. Test-time-augmented features: best-kappa weights of both 512 nets, and the 4x4 net's
#    final weights on other augmentations (--skip keeps the file names apart).
for cnf in c_512_5x5_32 c_512_4x4_32 c_512_5x5_32_ram c_512_4x4_32_ram; do
  $PY transform.py --cnf configs/${cnf}.py --train --test --n_iter "$TTA"
done
$PY transform.py --cnf configs/c_512_4x4_32.py --train --test --n_iter "$TTA" --skip "$TTA" \
    --weights_from weights/c_512_4x4_32/weights_final.pt

# 4. Blend per patient (runs of blend.yml), check on the validation patients, then predict.
$PY blend.py --per_patient --blend_cnf blend.yml --optimize_thresholds --n_iter 5
$PY blend.py --per_patient --blend_cnf blend.yml --optimize_thresholds --n_iter 5 --predict \
    --test_dir data/test_medium

# 5. Regression activation maps of the RAM nets (128 and 256 px like the paper, and 512 px).
for cnf in c_128_5x5_32_ram c_256_5x5_32_ram c_512_5x5_32_ram; do
  $PY ram.py --cnf configs/${cnf}.py --limit 200
done
echo "done: the submission is the newest data/sub_*.csv; heat maps are in data/ram/"
