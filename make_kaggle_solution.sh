#!/usr/bin/env bash
# Reproduce the Kaggle DR 2nd-place submission end to end, with the RAM nets and heat maps added.
# Needs data/train/*.jpeg, data/test/*.jpeg and data/trainLabels.csv (see data/README.md).
# Run it again after an interruption and it goes on where it stopped: convert.py skips finished
# images, a finished net (weights_final.pt) is not trained again and an interrupted one is
# continued with --resume, transform.py continues from its last save (every 5 iterations).
#   PYTHON=python3 ./make_kaggle_solution.sh     # the interpreter [default: .venv/bin/python]
#   TTA=10 ./make_kaggle_solution.sh             # TTA iterations [default: 50, as the original]
#   RAM=1 ./make_kaggle_solution.sh              # blend the RAM nets into the submission too
#   ./make_kaggle_solution.sh --dry-run          # print the commands, run nothing
#   ./make_kaggle_solution.sh --help             # this usage
set -euo pipefail

usage() {
  cat <<'USAGE'
Usage: ./make_kaggle_solution.sh [--dry-run | --help]

Reproduce the Kaggle DR 2nd-place solution end to end: convert the photographs
(512, 256, 128 px), train the 128 -> 256 -> 512 nets (baseline and RAM, 5x5 and
4x4), extract test-time-augmented features, blend per patient into
data/sub_*.csv, and draw the RAM nets' heat maps into data/ram/.  Needs
data/train/*.jpeg, data/test/*.jpeg and data/trainLabels.csv.  Run it again
after an interruption: finished work is skipped, interrupted work continues.

Options:
  -n, --dry-run   print each command (with the interpreter) instead of running it
  -h, --help      print this usage and exit

Environment:
  PYTHON=python3  the interpreter [default: .venv/bin/python]
  TTA=10          test-time augmentation iterations, a positive integer [default: 50]
  RAM=1           also blend the two 512-px RAM nets into the submission (blend_ram.yml's
                  runs); 0 [default] makes the original solution's six runs, which had no
                  RAM nets (they are trained for the heat maps either way)
USAGE
}

DRY_RUN=0
for argument in "$@"; do
  case "$argument" in
    -h|--help) usage; exit 0 ;;
    -n|--dry-run|--dry_run) DRY_RUN=1 ;;
    *) echo "error: unknown argument $argument; see ./make_kaggle_solution.sh --help" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")"
PY=${PYTHON:-.venv/bin/python}
TTA=${TTA:-50}
RAM=${RAM:-0}
# Checked before any work: a typo must not surface after days of training.
if ! [[ "$TTA" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: TTA=$TTA is not a positive whole number of iterations; e.g. TTA=50" >&2
  exit 2
fi
# transform.py's cap (retina/features/files.py MAX_TTA_ITERATIONS), compared as text first: a
# number of 19 digits or more would overflow bash's arithmetic (and --skip is 2 x TTA).
if [ ${#TTA} -gt 5 ] || [ "$TTA" -gt 10000 ]; then
  echo "error: TTA=$TTA is more than transform.py takes (10000 iterations); e.g. TTA=50" >&2
  exit 2
fi
if [ "$RAM" != 0 ] && [ "$RAM" != 1 ]; then
  echo "error: RAM=$RAM must be 0 (the original solution's blend) or 1 (add the RAM nets)" >&2
  exit 2
fi

run() {  # run COMMAND...: or only print it with --dry-run
  if [ "$DRY_RUN" = 1 ]; then
    echo "$*"
  else
    "$@"
  fi
}

train() {  # train CNF [OPTIONS...]: skipped once finished, continued after an interruption
  local cnf=$1
  shift
  local folder=data/train_medium
  case "$cnf" in c_128_*) folder=data/train_tiny ;; c_256_*) folder=data/train_small ;; esac
  if [ -f "weights/$cnf/weights_final.pt" ]; then
    echo "$cnf: already trained (weights/$cnf/weights_final.pt)"
  elif [ -f "weights/$cnf/last.pt" ]; then
    # This script's folders, named: the last.pt of another experiment (other images) is then
    # refused by train_nn.py, naming the folders, instead of continuing on its images.
    run $PY train_nn.py --cnf "configs/$cnf.py" --resume --train_dir "$folder" \
        --labels data/trainLabels.csv
  else
    run $PY train_nn.py --cnf "configs/$cnf.py" "$@"
  fi
}

# 1. Crop to the eye and resize: 512 px from the photographs, 256 and 128 from the 512s.
run $PY convert.py --directory data/train --convert_directory data/train_medium --crop_size 512
run $PY convert.py --directory data/test --convert_directory data/test_medium --crop_size 512
for split in train test; do
  run $PY convert.py --directory data/${split}_medium --convert_directory data/${split}_small --crop_size 256
  run $PY convert.py --directory data/${split}_medium --convert_directory data/${split}_tiny --crop_size 128
done

# 2. Train each net at 128, then 256 and 512 starting from the smaller net's final weights.
for variant in 5x5_32 4x4_32 5x5_32_ram 4x4_32_ram; do
  train c_128_${variant}
  train c_256_${variant} --weights_from weights/c_128_${variant}/weights_final.pt
  train c_512_${variant} --weights_from weights/c_256_${variant}/weights_final.pt
done

# 3. Test-time-augmented features of each 512 baseline net, as the original: three weight sets,
#    each on its own augmentations (--skip 0, TTA, 2 TTA keeps them and their files apart):
#    the last best/ file (lowest validation loss), weights.pt (best kappa), weights_final.pt.
#    --tta_sequence halton: the original's unscrambled Halton sequence (transform.py's default
#    scrambles it; see transform.py --help).
for cnf in c_512_5x5_32 c_512_4x4_32; do
  best_loss=$(ls "weights/$cnf/best/"*.pt 2>/dev/null | tail -n 1 || true)  # epoch-numbered names
  if [ -z "$best_loss" ]; then
    if [ "$DRY_RUN" != 1 ]; then
      echo "error: weights/$cnf/best/ holds no weights; train $cnf first" >&2
      exit 1
    fi
    best_loss="weights/$cnf/best/LAST.pt"
  fi
  run $PY transform.py --cnf configs/${cnf}.py --train --test --n_iter "$TTA" \
      --weights_from "$best_loss" --tta_sequence halton
  run $PY transform.py --cnf configs/${cnf}.py --train --test --n_iter "$TTA" --skip "$TTA" \
      --tta_sequence halton
  run $PY transform.py --cnf configs/${cnf}.py --train --test --n_iter "$TTA" \
      --skip $((2 * TTA)) --weights_from "weights/$cnf/weights_final.pt" --tta_sequence halton
done
if [ "$RAM" = 1 ]; then  # best-kappa weights of the 512 RAM nets
  for cnf in c_512_5x5_32_ram c_512_4x4_32_ram; do
    run $PY transform.py --cnf configs/${cnf}.py --train --test --n_iter "$TTA" \
        --tta_sequence halton
  done
fi

# 4. Blend per patient (the six runs of blend.yml, with RAM=1 also blend_ram.yml's): validation
#    kappa and confusion matrices with fixed and fitted cut-offs, then the submission with the
#    fitted ones.  --fit_on all fits the blend on every training image, as the original did
#    (blend.py's default fits on the validation patients only; see its --help).  The yml files name the 50-iteration features; with another TTA, or RAM=1, a
#    copy naming the features made above is written to data/.
BLEND=blend.yml
if [ "$TTA" != 50 ] || [ "$RAM" = 1 ]; then
  BLEND=data/blend_tta${TTA}.yml
  sources=blend.yml
  if [ "$RAM" = 1 ]; then
    BLEND=data/blend_tta${TTA}_ram.yml
    sources="blend.yml blend_ram.yml"
  fi
  if [ "$DRY_RUN" = 1 ]; then
    echo "# write $BLEND: the runs of $sources with the _iter_${TTA}_ features"
  else
    # shellcheck disable=SC2086  # two file names
    cat $sources | sed -e "s/_iter_50_skip_100/_iter_${TTA}_skip_$((2 * TTA))/" \
      -e "s/_iter_50_skip_50/_iter_${TTA}_skip_${TTA}/" -e "s/_iter_50_skip_0/_iter_${TTA}_skip_0/" \
      > "$BLEND"
  fi
fi
run $PY blend.py --per_patient --blend_cnf "$BLEND" --optimize_thresholds --n_iter 5 --predict \
    --fit_on all --test_dir data/test_medium

# 5. Regression activation maps of the RAM nets (128 and 256 px like the paper, and 512 px).
for cnf in c_128_5x5_32_ram c_256_5x5_32_ram c_512_5x5_32_ram; do
  run $PY ram.py --cnf configs/${cnf}.py --limit 200
done
if [ "$DRY_RUN" = 1 ]; then
  echo "# dry run: nothing was run"
else
  echo "done: the submission is the newest data/sub_*.csv; heat maps are in data/ram/"
fi
