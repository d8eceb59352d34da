#!/usr/bin/env bash
# Calls on the lent GPU (10 minutes each): the cuda tests and `falcon-mamba bench`, logs to $OUT.
#   benchmarks/device_run.sh tests-speed   # every cuda test, then the decode and prefill tables
#   benchmarks/device_run.sh paper         # 1M chunked prefill and the paper's figures: memcap
#                                          # (24 GB) and generation to 130k
#   benchmarks/device_run.sh quant         # bf16 vs int8 vs int4 batch-1 decode, 64 layers
#   benchmarks/device_run.sh verify        # the whole cuda suite, then sweep_decode.py (GEMV tiles,
#                                          # decode modes at 16 layers)
#   benchmarks/device_run.sh final3        # decode-path cuda tests, then `bench decode prefill`
#   benchmarks/device_run.sh ab            # L2 prefetch before the PDL wait on/off (decode steps)
#   benchmarks/device_run.sh suite         # the whole cuda suite, 8 pytest processes
#                                          # (carry: .whl with pytest-xdist + execnet, .data/shared)
# Run from the repository root with FALCON_MAMBA_COMMIT set to the commit the tree holds.
set -u
MODE=${1:-tests-speed}
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$OUT/results"
{
  echo "commit ${FALCON_MAMBA_COMMIT:-unknown}  mode $MODE"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1
case "$MODE" in
  tests-speed)
    cp "$OUT/env.txt" "$OUT/tests.txt"
    # programmatic dependent launch first: if its correctness test fails, the benchmark runs without
    if ! timeout 90 python3 -m pytest -q -x tests/test_decode_graph.py -k pdl >> "$OUT/tests.txt" 2>&1; then
      echo "PDL test failed: benchmark with FALCON_MAMBA_PDL=0" >> "$OUT/tests.txt"
      export FALCON_MAMBA_PDL=0
    fi
    timeout 230 python3 -m pytest -q -rs -m cuda --durations=12 tests/ >> "$OUT/tests.txt" 2>&1
    echo "pytest exit $?" >> "$OUT/tests.txt"
    timeout $((560 - SECONDS)) python3 -m falcon_mamba bench decode prefill \
      --out "$OUT/results" > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|PDL" "$OUT/tests.txt" | tail -5 ;;
  paper)
    timeout 540 python3 -m falcon_mamba bench chunked memcap generation --out "$OUT/results" \
      --deadline 440 > "$OUT/bench.log" 2>&1 ;;
  final)
    # every cuda test, file by file (a slow file cannot hide the others' results), then the paper part
    cp "$OUT/env.txt" "$OUT/tests.txt"
    for spec in test_triton_scan:90 test_triton_conv:15 test_triton_decode:20 test_triton_gemv:30 \
                test_decode_graph:60 test_quant_triton:20 test_generate:15 test_cli_generate:15; do
      f=${spec%%:*}; t=${spec##*:}
      echo "== $f (limit ${t}s)" >> "$OUT/tests.txt"
      timeout "$t" python3 -m pytest -q -rfEs --tb=short --durations=4 -m cuda "tests/$f.py" >> "$OUT/tests.txt" 2>&1
      echo "exit $?" >> "$OUT/tests.txt"
    done
    left=$((585 - SECONDS))
    timeout "$left" python3 -m falcon_mamba bench chunked memcap generation --out "$OUT/results" \
      --deadline $((left - 75)) > "$OUT/bench.log" 2>&1
    grep -E "^== |passed|failed|error|^exit" "$OUT/tests.txt" ;;
  suite)
    # the whole cuda suite in one call: pytest-xdist (carried as wheels in .whl, see the device
    # README) compiles the Triton variants in 8 processes; ../shared carried as .data/shared
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit 1
    export FALCON_MAMBA_SHARED=$PWD/.data/shared
    cp "$OUT/env.txt" "$OUT/tests.txt"
    timeout 470 python3 -m pytest -q -n 8 -rfEs --tb=short --durations=15 -m cuda tests/ \
      >> "$OUT/tests.txt" 2>&1
    echo "exit $?" >> "$OUT/tests.txt"
    # then, in the time left, batch-1 decode with every projection mode timed by the autotune
    if [ $SECONDS -lt 470 ]; then
      timeout $((585 - SECONDS)) python3 -m falcon_mamba bench decode \
        --no-baseline --decode-batches 1 --out "$OUT/results" > "$OUT/bench.log" 2>&1
    fi
    tail -30 "$OUT/tests.txt" ;;
  verify)
    # the whole cuda suite (8 processes, each test listed), then the GEMV sweep and the decode modes
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit 1
    export FALCON_MAMBA_SHARED=$PWD/.data/shared
    cp "$OUT/env.txt" "$OUT/tests.txt"
    timeout 330 python3 -m pytest -q -n 8 -rA --tb=short --durations=10 -m cuda tests/ \
      >> "$OUT/tests.txt" 2>&1
    echo "exit $?" >> "$OUT/tests.txt"
    export PYTHONPATH=.
    timeout $((575 - SECONDS)) python3 benchmarks/sweep_decode.py --out "$OUT/results/sweep.json" \
      --budget-s 75 --layers 16 --shapes in_proj_rstd,out_proj_nepi,x_proj_cx,in_proj,out_proj \
      > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -15 ;;
  ab)
    # L2 prefetch before the PDL wait (triton_gemv.PREFETCH_TILES 0/1/4), PDL forced on: 16 layers x 3
    # formats, then 64 layers bf16; plus the GEMV tiles of lm_head and x_proj (xsplit)
    export FALCON_MAMBA_PDL=1
    timeout 300 python3 benchmarks/sweep_decode.py --out "$OUT/results/sweep16.json" --budget-s 40 \
      --shapes lm_head,x_proj --layers 16 --modes triton,triton_cx --prefetch 0,1,4 > "$OUT/bench.log" 2>&1
    timeout $((575 - SECONDS)) python3 benchmarks/sweep_decode.py --out "$OUT/results/sweep64.json" \
      --skip-kernels --layers 64 --formats bf16 --modes triton_cx,triton --prefetch 0,1,4 >> "$OUT/bench.log" 2>&1 ;;
  final3)
    # the cuda tests of the decode path (8 processes), then the decode and prefill tables
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. || exit 1
    export FALCON_MAMBA_SHARED=$PWD/.data/shared
    cp "$OUT/env.txt" "$OUT/tests.txt"
    timeout 200 python3 -m pytest -q -n 8 -rA --tb=short -m cuda tests/test_decode_graph.py \
      tests/test_triton_gemv.py tests/test_decode_chain.py tests/test_triton_decode.py \
      tests/test_quant_triton.py >> "$OUT/tests.txt" 2>&1
    echo "exit $?" >> "$OUT/tests.txt"
    export PYTHONPATH=.
    timeout $((585 - SECONDS)) python3 -m falcon_mamba bench decode prefill --out "$OUT/results" \
      > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8 ;;
  int8tiles)
    timeout 300 python3 benchmarks/sweep_decode.py --out "$OUT/results/sweep.json" --skip-model \
      --budget-s 90 --shapes in_proj,out_proj --formats int8 > "$OUT/bench.log" 2>&1 ;;
  quant)
    timeout 540 python3 benchmarks/bench_quant.py --layers 64 --json "$OUT/results/quant.json" \
      > "$OUT/bench.log" 2>&1 ;;
esac
tail -45 "$OUT/bench.log"
