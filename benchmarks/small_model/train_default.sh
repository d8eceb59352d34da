#!/usr/bin/env bash
# The one command that makes the embedded default model, and its Transformer reference.
#
#   bash benchmarks/small_model/train_default.sh [--time-budget S] [--set key=value ...]
#
# 1. prepare-data: fit an 8k BPE to the corpus's training split and tokenize it (skipped when
#    $DATA already holds it; prepare it on a machine that has ../shared/corpus and carry .data/).
# 2. compare.py: train Falcon Mamba (recipe default-model), then a same-size Transformer on the same
#    batches; write the table, loss curves and the bf16 model to $RESULTS.
# 3. Install with: python3 -m benchmarks.small_model.install_default $RESULTS
#
# Environment: CORPUS (default ../shared/corpus), DATA (.data/corpus-bpe8k), RUNS (.runs/default-model),
# RESULTS (default $RUNS/results).
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS=${CORPUS:-../shared/corpus}
DATA=${DATA:-.data/corpus-bpe8k}
RUNS=${RUNS:-.runs/default-model}
RESULTS=${RESULTS:-$RUNS/results}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
if [ ! -f "$DATA/meta.json" ]; then
  python3 -m falcon_mamba prepare-data --tokenizer bpe:8192 --out "$DATA" \
    "$CORPUS/shakespeare.txt" "$CORPUS/kjv-bible.txt" "$CORPUS/python-docs.txt" "$CORPUS/jargon.txt"
fi
rm -rf "$RUNS/mamba" "$RUNS/transformer"
python3 -m benchmarks.small_model.compare --data "$DATA" --out "$RUNS" --results "$RESULTS" \
  --preset default-model "$@"
