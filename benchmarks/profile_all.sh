#!/usr/bin/env bash
# The CPU profiles of docs/benchmarks.md ("Current figures"): `approxctl profile` of TinyConv and
# ResNet-tiny on every target, batch 128 on Fashion-MNIST, one after another. Run it on an
# otherwise idle machine: it times the machine. Each run leaves $OUT/profile_MODEL_TARGET.json,
# the names benchmarks/gpu_check.sh writes too; then
#     .venv/bin/python benchmarks/profile_table.py runs/profiles
# prints the tables.
#
# Settings (environment): MODELS, TARGETS, ITERS (timed rounds, default 15), BATCH (default 128),
# OUT (default runs/profiles), APPROXCTL (the command, default .venv/bin/approxctl). A profile
# already in $OUT is kept (the script resumes); delete it to measure again.
set -euo pipefail
cd "$(dirname "$0")/.."
APPROXCTL=${APPROXCTL:-${BIN:-.venv/bin}/approxctl}
OUT=${OUT:-runs/profiles}
mkdir -p "$OUT"
for model in ${MODELS:-tinyconv resnet_tiny}; do
  for target in ${TARGETS:-sc am analog}; do
    file="$OUT/profile_${model}_${target}.json"
    if [[ -s "$file" ]]; then continue; fi
    echo "== $model $target: approxctl profile $model --target $target" >&2
    # shellcheck disable=SC2086  # APPROXCTL may be a command with arguments (python3 -m ...)
    $APPROXCTL profile "$model" --target "$target" --batch-size "${BATCH:-128}" \
      --iters "${ITERS:-15}" --json > "$file.tmp"
    mv "$file.tmp" "$file"  # a finished profile only: an interrupted one is measured again
  done
done
