#!/usr/bin/env bash
# Reproduces docs/results.md: the paper's Tables 2, 4/5 and 7 on Fashion-MNIST, for TinyConv and
# ResNet-tiny on all three targets. Every column of one model starts from the same float weights,
# trained by approxctl itself, and uses the same seed, data subset and epoch budget:
#   inference only      the float weights evaluated on the hardware (exact mode)
#   with model          EPOCHS + FINETUNE epochs with the exact emulation throughout
#   error injection     EPOCHS epochs of error injection
#   fine-tuning         the same run, then FINETUNE epochs with the exact emulation
#   no proxy (Table 2)  "with model", but the backward is the plain conv gradient
# Then: .venv/bin/python benchmarks/results_table.py runs/results > docs/results.md
#
# Settings (environment): EPOCHS, FINETUNE, PRETRAIN, MODELS, TARGETS, LIMIT_TRAIN, LIMIT_VAL,
# LR and SCHEDULER (of every non-float run; the float pretraining keeps lr 0.01, cosine),
# NOPROXY=0 (skip the no-proxy runs), WEIGHTS (the OUT of an earlier run: its
# MODEL-float/pretrained.safetensors replace pretraining again), DATA (a --data spec), OUT,
# APPROXCTL (the command, default .venv/bin/approxctl), and JOBS:
# how many runs of one model go at once after its float pretraining (default 1; more only where
# the accuracy matters and not the per-epoch seconds, which concurrent runs distort).
set -euo pipefail
cd "$(dirname "$0")/.."
APPROXCTL=${APPROXCTL:-${BIN:-.venv/bin}/approxctl}
OUT=${OUT:-runs/results}
EPOCHS=${EPOCHS:-2}
FINETUNE=${FINETUNE:-1}
PRETRAIN=${PRETRAIN:-4}
MODELS=${MODELS:-"tinyconv resnet_tiny"}
TARGETS=${TARGETS:-"sc am analog"}
JOBS=${JOBS:-1}
COMMON=(--data "${DATA:-fashion-mnist}" --limit-train "${LIMIT_TRAIN:-8192}"
        --limit-val "${LIMIT_VAL:-2000}" --batch-size 128 --seed 0 --quiet --json)
TRAIN=(--lr "${LR:-0.01}" --scheduler "${SCHEDULER:-cosine}")
mkdir -p "$OUT"

run() {  # run NAME ARGS...: one approxctl train, its JSON report kept as $OUT/NAME.json
    local name=$1; shift
    if [[ -s "$OUT/$name.json" ]]; then return; fi  # finished earlier: the script resumes
    echo "== $name: approxctl train $*" >&2
    # shellcheck disable=SC2086  # APPROXCTL may be a command with arguments (python3 -m ...)
    if $APPROXCTL train "$@" "${COMMON[@]}" --out "$OUT/$name" > "$OUT/$name.json.tmp" \
        2> "$OUT/$name.log"; then
        mv "$OUT/$name.json.tmp" "$OUT/$name.json"
    else
        echo "!! $name failed: $(tail -n 1 "$OUT/$name.log")" >&2
        return 1
    fi
}

throttle() {  # wait until fewer than JOBS runs are going
    while (( $(jobs -rp | wc -l) >= JOBS )); do wait -n || status=1; done
}

total=$(python3 -c "print($EPOCHS + $FINETUNE)")
status=0
for model in $MODELS; do
    if [[ -n ${WEIGHTS:-} ]]; then
        weights="$WEIGHTS/$model-float/pretrained.safetensors"
        cp -n "$WEIGHTS/$model-float.json" "$OUT/"  # its float column, for results_table.py
    else
        run "$model-float" "$model" --target am --pretrain "$PRETRAIN" --epochs 0 --finetune 0 \
            --lr 0.01 --scheduler cosine || { status=1; continue; }
        weights="$OUT/$model-float/pretrained.safetensors"
    fi
    for target in $TARGETS; do
        throttle
        run "$model-$target-inject" "$model" --target "$target" --weights "$weights" \
            --epochs "$EPOCHS" --finetune "$FINETUNE" "${TRAIN[@]}" &
        throttle
        run "$model-$target-exact" "$model" --target "$target" --weights "$weights" \
            --epochs 0 --finetune "$total" "${TRAIN[@]}" &
        if [[ $target != am && ${NOPROXY:-1} != 0 ]]; then
            throttle
            run "$model-$target-noproxy" "$model" --target "$target" --weights "$weights" \
                --epochs 0 --finetune "$total" --no-proxy "${TRAIN[@]}" &
        fi
    done
    while (( $(jobs -rp | wc -l) > 0 )); do wait -n || status=1; done
done
exit $status
