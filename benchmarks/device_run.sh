#!/usr/bin/env bash
# One call on the lent GPU: the cuda tests, kernel timings and `falcon-mamba bench`, logs to $OUT.
#   benchmarks/device_run.sh dev    # fast tests only, paper figures at reduced sizes
#   benchmarks/device_run.sh final  # every cuda test, the full benchmark
# Run from the repository root with FALCON_MAMBA_COMMIT set to the commit the tree holds.
set -u
MODE=${1:-final}
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$OUT/results"
T="tests/test_triton_scan.py tests/test_triton_conv.py tests/test_triton_decode.py tests/test_decode_graph.py"
{
  echo "commit ${FALCON_MAMBA_COMMIT:-unknown}  mode $MODE"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/tests.txt" 2>&1
if [ "$MODE" = dev ]; then
  timeout 210 python3 -m pytest -q -rs -m "cuda and not slow" $T >> "$OUT/tests.txt" 2>&1
  timeout 100 python3 benchmarks/kernel_bench.py > "$OUT/kernels.txt" 2>&1
  timeout 330 python3 -m falcon_mamba bench all --out "$OUT/results" --long-prompt 131072 \
    --memcap-limit 131072 --gen-positions 0,32768 --gen-tokens 128 --gen-edge-tokens 256 \
    --tf-gen-tokens 8 --decode-tokens 256 --hf-decode-tokens 4 --hf-prefill-length 512 \
    --deadline 250 > "$OUT/bench.log" 2>&1
else
  timeout 150 python3 -m pytest -q -rs -m cuda $T >> "$OUT/tests.txt" 2>&1
  timeout 420 python3 -m falcon_mamba bench all --out "$OUT/results" --deadline 330 > "$OUT/bench.log" 2>&1
fi
tail -5 "$OUT/tests.txt"; tail -40 "$OUT/bench.log"
