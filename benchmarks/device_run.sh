#!/usr/bin/env bash
# Calls on the lent GPU (10 minutes each): the cuda tests and the benchmarks, logs to $OUT.
#   benchmarks/device_run.sh suite      # the whole cuda suite alone (LIMIT seconds)
#   benchmarks/device_run.sh verify     # the whole cuda suite (8 pytest processes, every test listed),
#                                       # then sweep_decode.py (GEMV tiles, decode modes at 16 layers)
#   benchmarks/device_run.sh speed      # the decode-path cuda tests, then `bench decode prefill`
#   benchmarks/device_run.sh paper      # 1M chunked prefill and the paper's figures: memcap (24 GB)
#                                       # and generation to 130k
#   benchmarks/device_run.sh quant      # bf16 vs int8 vs int4 batch-1 decode, 64 layers
#   benchmarks/device_run.sh int8tiles  # more int8 in_proj/out_proj GEMV tiles
#   benchmarks/device_run.sh i4x2       # the packed int4 GEMV's cuda tests, its tiles, then bench_quant
#                                       # (64 layers) with the fastest tiles
#   benchmarks/device_run.sh profile    # per-kernel time of the graphed decode step, bf16/int8/int4
#   benchmarks/device_run.sh quantcheck # the GEMV / decode cuda tests, then bench_quant (64 layers)
#   benchmarks/device_run.sh final      # the whole cuda suite, then bench_quant (64 layers)
#   benchmarks/device_run.sh decode15   # the whole cuda suite, then `bench decode` (kernel loop,
#                                       # fm.generate greedy/sampled, transformers) at batch 1 and 64
#   benchmarks/device_run.sh serve15    # the OpenAI server on a random 7B folder: 1/16/64/256 streaming
#                                       # clients, then 32 streams beside a 100k-token prompt
#   benchmarks/device_run.sh sampler    # the sampler kernel's cuda tests and bench_sampler.py
#   benchmarks/device_run.sh hf17       # the whole cuda suite, then bench_hf_accelerate.py --gpu
#                                       # (transformers generate and a 1.5B training step, with and
#                                       # without falcon_mamba.hf.accelerate)
#   benchmarks/device_run.sh prefill18  # profile_prefill.py (a 7B chunk's GPU and host time by length),
#                                       # then train18, then bench_train.py --shape 7b (Mamba only)
#   benchmarks/device_run.sh kern11     # scan/decode/prefill-graph/mixer cuda tests; scan bwd old vs new; ssm rows; train 1.5B
#   benchmarks/device_run.sh prof12     # the quantized-dt step's cuda tests; a 1.5B training step profiled
#   benchmarks/device_run.sh conv12     # the conv backward's tap sums and tiles; the 1.5B Mamba step
#   benchmarks/device_run.sh scanfwd19  # scan/decode/mixer cuda tests, bench_scan_fwd.py vs .data/base_scan.py
#                                       # (git show <commit>:falcon_mamba/ops/triton_scan.py > .data/base_scan.py)
#   benchmarks/device_run.sh chunk15    # kernel_bench.py --parts scaninfer, then `bench prefill`
#   benchmarks/device_run.sh train7b    # bench_train.py --shape 7b (Mamba, the 7B recipe's step)
#   benchmarks/device_run.sh prof15     # prefill's kernels: 16 / 64 x 32 prompt graphs, one 2k / 16k row
#   benchmarks/device_run.sh regcap15   # the scan backward's pass 3 at maxnreg 128 / 168 / 200
#   benchmarks/device_run.sh serve14    # burst13 + mixed13's first three pairs
#   benchmarks/device_run.sh burst13    # batched fresh-prompt graph replays by shape (profile_prefill --batches)
#   benchmarks/device_run.sh mixed13    # the mixed load under --prefill-chunk x --long-prompt-interval pairs
#   benchmarks/device_run.sh diag16     # the whole cuda suite, a fresh 2k forward's host profile, engine waves
#   benchmarks/device_run.sh serve16    # bf16-state cuda tests; serve fp32 (sweep + mixed), then bf16 (64, 256)
#   benchmarks/device_run.sh phase16    # session 14's cuda tests; serve 64 / 256 with per-part host times
#   benchmarks/device_run.sh last16     # engine cuda tests; serve 64 / 256 with fp32 and with bf16 states
#   benchmarks/device_run.sh lanes20    # the backward's lane sums, the conv final-state kernel: tests, bench_scan_bwd, training, prompt replays
#   benchmarks/device_run.sh check20    # lanes20's unfinished cuda tests, bench_scan_bwd with register caps, the server
#   benchmarks/device_run.sh train21    # the 1.5B step (both models, the CLI, profiled), then `bench prefill`
#   benchmarks/device_run.sh norm21     # the norm backward kernel: cuda tests, the forward's chunk at training, the 1.5B step
#   benchmarks/device_run.sh ce21       # the loss's softmax kernel: cuda tests, the forward's unroll x chunk, the 1.5B step
#   benchmarks/device_run.sh step21     # cuda tests of the loss kernel, norm backward, scan forward; the 1.5B step profiled
#   benchmarks/device_run.sh train22    # the training add + norm, loss kernel, norm backward: cuda tests; the 1.5B step (both, CLI)
#   benchmarks/device_run.sh final22    # session 18's final: training cuda tests, the 1.5B step, serve at 0.5 / 0.1 ms switch
#   benchmarks/device_run.sh fwd22      # the training forward's one pass on the bench's and the step's inputs
#   benchmarks/device_run.sh pf23       # the scan backward's state loads a step ahead (prepared) against the default
#   benchmarks/device_run.sh ahead20    # the backward's loads a step ahead against the lane sums alone
#   benchmarks/device_run.sh final19    # the whole cuda suite, then the server at 64 / 256 (session 17's first call)
#   benchmarks/device_run.sh move18     # the server at 64 clients, 64 slots (the pool's scratch moves)
#   benchmarks/device_run.sh gc18       # the server at 0caa448 and at this tree (the heap frozen after warm-up)
#   benchmarks/device_run.sh ab18       # the server at 5bfdc65 and at this tree in one call
#   benchmarks/device_run.sh xproj18    # the split x_proj: cuda tests, its shapes in the step, the server
#   benchmarks/device_run.sh final18    # the whole cuda suite, then the server at 64 / 256 (session 16's first call)
#   benchmarks/device_run.sh serve17    # decode-graph tests, the server at 64 / 256 (fp32, bf16), profile_decode
#   benchmarks/device_run.sh gemm17     # bench_decode_gemms.py, then bench_scan_fwd at 16 / 64 x 32
#   benchmarks/device_run.sh ssm17      # sweep_step_kernels.py in the step, then a 16 x 32 prompt replay's kernels
#   benchmarks/device_run.sh final16    # the whole cuda suite, then profile_decode at 64 / 256 rows, fp32 and bf16 states
#   benchmarks/device_run.sh serve11    # serve 1/16/64/256 + mixed (kern11 also needs .data/old_scan.py:
#                                       # git show 2d4f3fa:falcon_mamba/ops/triton_scan.py > .data/old_scan.py)
#   benchmarks/device_run.sh train18    # bench_train.py at the 1.5B shape (Mamba, Mamba without the
#                                       # fused paths, the Transformer, `falcon-mamba train`)
# Carry .whl (wheels the image lacks: fastapi, uvicorn, starlette, pydantic, openai, httptools...)
# and .data/shared (../shared's tokenizers).
# Run from the repository root with FALCON_MAMBA_COMMIT set to the commit the tree holds.
set -u
MODE=${1:-verify}
export PYTHONPATH=. PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
mkdir -p "$OUT/results"
{
  echo "commit ${FALCON_MAMBA_COMMIT:-unknown}  mode $MODE"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
} > "$OUT/env.txt" 2>&1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || echo "no wheels in .whl" >> "$OUT/env.txt"
export PYTHONPATH=/tmp/site:. FALCON_MAMBA_SHARED=$PWD/.data/shared

left() {  # left RESERVE_S: seconds of LIMIT left after keeping RESERVE_S back, at least 1
  local s=$(( ${LIMIT:-585} - $1 - SECONDS ))
  echo $(( s < 1 ? 1 : s ))
}

mixed_pairs() {  # mixed_pairs CHUNK:INTERVAL...: the mixed load alone under each server setting
  local cfg c i
  for cfg in "$@"; do
    c=${cfg%%:*}; i=${cfg##*:}
    timeout $(left 5) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 64 --clients 1 --requests 2 --max-tokens 8 \
      --temperature 0 --mixed 32:100000 --procs 8 --server-arg=--prefill-chunk=$c \
      --server-arg=--long-prompt-interval=$i --out "$OUT/mixed-$c-$i.json" > "$OUT/mixed-$c-$i.log" 2>&1
    grep "^mixed" "$OUT/mixed-$c-$i.log" | sed "s/^/chunk $c interval $i: /"
  done
}

serve_here() {  # the server from this tree at 64 / 256 clients (fp32 states) in what LIMIT leaves
  timeout $(left 5) python3 benchmarks/load_test.py --random 7b \
    --tokenizer-dir .data/shared/tokenizers/falcon --slots 256 --sweep 64,256 --max-tokens 128 \
    --temperature 0 --procs 8 --out "$OUT/serve.json" > "$OUT/bench.log" 2>&1
  grep -v "^{" "$OUT/bench.log" | head -24
}

serve_ab() {  # serve_ab OLD_TREE RESERVE_S: the server at 64 / 256 clients from OLD_TREE (a `git archive`
  # of an earlier commit's falcon_mamba and benchmarks/load_test.py under .data), keeping RESERVE_S
  # for the second run, then from this tree, in one call
  local root=$PWD
  (cd "$1" && PYTHONPATH=/tmp/site:. timeout $(left "$2") python3 benchmarks/load_test.py --random 7b \
    --tokenizer-dir "$root/.data/shared/tokenizers/falcon" --slots 256 --sweep 64,256 --max-tokens 128 \
    --temperature 0 --procs 8 --out "$OUT/serve-old.json" > "$OUT/bench-old.log" 2>&1)
  echo "== $1"; grep -E "^throughput|GPU time" "$OUT/bench-old.log" | head -8
  echo "== this tree"; serve_here
}

cuda_tests() {  # cuda_tests LIMIT_S FILES...: 8 pytest processes (the suite is compile-bound)
  local limit=$1
  shift
  cp "$OUT/env.txt" "$OUT/tests.txt"
  timeout "$limit" python3 -m pytest -v -n 8 -rA --tb=short --durations=10 -m cuda "$@" >> "$OUT/tests.txt" 2>&1
  echo "exit $?" >> "$OUT/tests.txt"
}

case "$MODE" in
  suite)  # the whole cuda suite alone, within LIMIT
    cuda_tests $(left 5) tests/
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -15 ;;
  verify)
    cuda_tests 330 tests/
    timeout $((575 - SECONDS)) python3 benchmarks/sweep_decode.py --out "$OUT/results/sweep.json" \
      --budget-s 75 --layers 16 > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -15 ;;
  speed)
    cuda_tests 200 tests/test_decode_graphs.py tests/test_triton_gemv.py tests/test_triton_gemv_i4.py \
      tests/test_triton_decode.py tests/test_quant_triton.py
    timeout $((585 - SECONDS)) python3 -m falcon_mamba bench decode prefill --out "$OUT/results" \
      > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8 ;;
  paper)
    timeout 540 python3 -m falcon_mamba bench chunked memcap generation --out "$OUT/results" \
      --deadline 440 > "$OUT/bench.log" 2>&1 ;;
  quant)
    timeout 540 python3 benchmarks/bench_quant.py --layers 64 --json "$OUT/results/quant.json" \
      > "$OUT/bench.log" 2>&1 ;;
  int8tiles)
    timeout 300 python3 benchmarks/sweep_decode.py --out "$OUT/results/sweep.json" --skip-model \
      --budget-s 90 --shapes in_proj,out_proj --formats int8 > "$OUT/bench.log" 2>&1 ;;
  i4x2)
    cuda_tests 150 tests/test_triton_gemv_i4.py
    timeout $((585 - SECONDS)) python3 benchmarks/sweep_i4x2.py --out "$OUT/results" --budget-s 120 \
      > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8 ;;
  quantcheck)
    cuda_tests 240 tests/test_triton_gemv_i4.py tests/test_triton_gemv.py tests/test_decode_graphs.py \
      tests/test_quant_triton.py
    timeout $((585 - SECONDS)) python3 benchmarks/bench_quant.py --layers 64 --json "$OUT/results/quant.json" \
      > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8 ;;
  final)
    cuda_tests 330 tests/
    timeout $((585 - SECONDS)) python3 benchmarks/bench_quant.py --layers 64 --json "$OUT/results/quant.json" \
      > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8 ;;
  decode15)
    cuda_tests 290 tests/
    timeout 60 python3 benchmarks/bench_sampler.py --out "$OUT/results/sampler.json" > "$OUT/sampler.log" 2>&1
    timeout $((585 - SECONDS)) python3 -m falcon_mamba bench decode --out "$OUT/results" \
      --tokenizer .data/shared/tokenizers/falcon --decode-batches 1,64 --decode-tokens 512 \
      --generate-tokens 256 > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -15 ;;
  serve15)
    timeout ${SERVE_LIMIT:-585} python3 benchmarks/load_test.py --random 7b --tokenizer-dir .data/shared/tokenizers/falcon \
      --slots 256 --sweep 1,16,64,256 --max-tokens 128 --temperature 0 --mixed 32:100000 --procs 8 \
      --out "$OUT/results/serve.json" > "$OUT/bench.log" 2>&1 ;;
  sampler)
    cuda_tests 200 tests/test_sample_rows.py tests/test_engine.py
    timeout $((585 - SECONDS)) python3 benchmarks/bench_sampler.py > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8 ;;
  hf17)
    cuda_tests 290 tests/
    timeout $((585 - SECONDS)) python3 benchmarks/bench_hf_accelerate.py --gpu --budget-s $((540 - SECONDS)) \
      --json "$OUT/results/hf-accelerate.json" > "$OUT/bench.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -15 ;;
  prefill18)
    timeout 150 python3 benchmarks/profile_prefill.py --out "$OUT/results/profile-prefill.json" > "$OUT/prefill.log" 2>&1
    timeout $((480 - SECONDS)) python3 benchmarks/bench_train.py --shape 1.5b --models mamba,mamba-plain,transformer \
      --out "$OUT/results" > "$OUT/bench.log" 2>&1
    timeout $((585 - SECONDS)) python3 benchmarks/bench_train.py --shape 7b --models mamba --no-cli \
      --out "$OUT/results/7b" > "$OUT/bench7b.log" 2>&1
    tail -30 "$OUT/prefill.log"; tail -12 "$OUT/bench7b.log" ;;
  kern11)  # the chunked scan backward, the SSM rows kernel, the fused mixer: tests, kernels, training
    cuda_tests 190 tests/test_mixer_autograd.py tests/test_prefill_graphs.py tests/test_triton_decode.py \
      tests/test_triton_scan.py
    timeout 60 python3 benchmarks/bench_scan_bwd.py --old .data/old_scan.py > "$OUT/scan_bwd.log" 2>&1
    timeout 60 python3 benchmarks/kernel_bench.py --parts ssmrows --out "$OUT/results/ssmrows.json" \
      > "$OUT/ssmrows.log" 2>&1
    timeout $((${LIMIT:-585} - 10 - SECONDS)) python3 benchmarks/bench_train.py --shape 1.5b \
      --models mamba,transformer --no-cli --warmup 2 --steps 3 --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8; cat "$OUT/scan_bwd.log"
    grep -v "^{\"" "$OUT/ssmrows.log" | tail -30; grep -E "^\||x \(target" "$OUT/train.log" ;;
  prof12)  # the 7B quantized-dt step tests, then one 1.5B Mamba training step under torch.profiler
    cp "$OUT/env.txt" "$OUT/tests.txt"
    timeout -s INT -k 20 120 python3 -m pytest -q -n 8 -rfE --tb=short -m cuda tests/test_triton_decode.py \
      -k quantized_dt_7b >> "$OUT/tests.txt" 2>&1
    echo "exit $?" >> "$OUT/tests.txt"
    timeout $((${LIMIT:-585} - 10 - SECONDS)) python3 benchmarks/bench_train.py --shape 1.5b --models mamba \
      --no-cli --warmup 2 --steps 3 --profile --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -8; grep -v "^{\"" "$OUT/train.log" | tail -50 ;;
  conv12)  # the conv backward (per-tap sums vs per-step reductions, a few tiles), then the 1.5B Mamba step
    timeout 100 python3 benchmarks/bench_conv_bwd.py --quick > "$OUT/conv_bwd.log" 2>&1
    timeout $((${LIMIT:-585} - 5 - SECONDS)) python3 benchmarks/bench_train.py --shape 1.5b --models mamba \
      --no-cli --warmup 2 --steps 3 --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -v "^{\"" "$OUT/conv_bwd.log"; grep -E "^\||rate" "$OUT/train.log" ;;
  scanfwd19)  # the scan forward's 64-bit B/C loads and series softplus: the scan / decode / mixer
              # cuda tests, then bench_scan_fwd.py against the previous forward (.data/base_scan.py)
    cuda_tests $(left 150) tests/test_triton_scan.py tests/test_triton_decode.py tests/test_mixer_autograd.py
    tail -3 "$OUT/tests.txt"
    timeout $(left 3) python3 benchmarks/bench_scan_fwd.py --base .data/base_scan.py \
      --variants ${VARIANTS:-32:2:1,64:2:1,64:1:1,32:4:1,64:4:1} > "$OUT/bench.log" 2>&1 ;;
  move18)  # the server at 64 clients (64 slots: a short warm-up) with the state pool's bulk moves
           # through its scratch: the release phase's host times in the step log
    timeout $(left 5) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 64 --sweep 64 --max-tokens 128 \
      --temperature 0 --procs 8 --out "$OUT/serve.json" > "$OUT/bench.log" 2>&1
    grep -v "^{" "$OUT/bench.log" | head -12 ;;
  gc18)  # warm-up cuda tests; the server at 0caa448 (.data/oldsplit: git archive 0caa448 falcon_mamba
         # benchmarks/load_test.py) and at this tree (at 7a75a9e: the heap frozen after the warm-up)
    cuda_tests 45 tests/test_warm_up.py
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -4
    serve_ab .data/oldsplit 150 ;;
  ab18)  # decode cuda tests; the server at 5bfdc65 (.data/old5bf: git archive 5bfdc65 falcon_mamba
         # benchmarks/load_test.py; auto = cublas / cublas_lt) and at this tree (split_x modes too)
    cuda_tests 120 tests/test_decode_graphs.py tests/test_warm_up.py tests/test_triton_decode.py
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -8
    serve_ab .data/old5bf 200 ;;
  xproj18)  # the split x_proj's cuda tests; its launch shapes in the 64- / 256-row step against
            # cublas / cublas_lt; the server at 64 / 256 (fp32 states) with the 4-mode bucket autotune
    cuda_tests 100 tests/test_triton_decode.py tests/test_decode_graphs.py -k "xproj or forced or bucket"
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -8
    timeout $(left 300) python3 benchmarks/sweep_step_kernels.py --kernel xproj --state-dtypes float32 \
      --out "$OUT/results/sweep-xproj.json" > "$OUT/sweep.log" 2>&1
    grep -E "@|Error|error" "$OUT/sweep.log" | head -30
    serve_here ;;
  lanes20)  # the backward's dB / dC as lane sums and the conv final state as one kernel: their cuda
            # tests; bench_scan_bwd.py against a6a7929's backward (.data/old_bwd.py: git show
            # a6a7929:falcon_mamba/ops/triton_scan_bwd.py); the 1.5B training step, both models; the
            # batched prompt replays at a6a7929 (.data/olda6: git archive a6a7929 falcon_mamba
            # benchmarks/load_test.py benchmarks/profile_prefill.py) and here
    cuda_tests 170 tests/test_triton_scan.py tests/test_mixer_autograd.py tests/test_triton_conv.py \
      tests/test_prefill_graphs.py -k "backward or bwd or mixer or conv or prefill or graph or lane"
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6
    timeout $(left 330) python3 benchmarks/bench_scan_bwd.py --old .data/old_bwd.py > "$OUT/scan_bwd.log" 2>&1
    tail -4 "$OUT/scan_bwd.log"
    timeout $(left 90) python3 benchmarks/bench_train.py --shape 1.5b --models mamba,transformer --no-cli \
      --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "^\||x \(target|rate" "$OUT/train.log"
    (cd .data/olda6 && PYTHONPATH=/tmp/site:. timeout $(left 45) python3 benchmarks/profile_prefill.py \
      --lengths 32 --reps 5 --batches 16x32,64x32 --out "$OUT/results/prefill-batches-old.json" \
      > "$OUT/prefill-old.log" 2>&1)
    timeout $(left 5) python3 benchmarks/profile_prefill.py --lengths 32 --reps 5 --batches 16x32,64x32 \
      --out "$OUT/results/prefill-batches.json" > "$OUT/prefill.log" 2>&1
    echo "== a6a7929"; grep -E " x " "$OUT/prefill-old.log"; echo "== this tree"; grep -E " x " "$OUT/prefill.log" ;;
  check20)  # lanes20's cuda tests cut by its limit (the long scan and conv backward ones, the prompt
            # graphs, the engine); bench_scan_bwd.py against a6a7929's backward with register caps
            # (10 and 9 one-warp programs an SM); the server at 64 / 256 clients
    cuda_tests 200 tests/test_triton_scan.py::test_backward_cuda tests/test_triton_scan.py::test_backward_cuda_past_65k \
      tests/test_triton_conv.py::test_backward_cuda tests/test_prefill_graphs.py tests/test_engine.py
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6
    timeout $(left 150) python3 benchmarks/bench_scan_bwd.py --old .data/old_bwd.py --maxnreg 200,216 \
      > "$OUT/scan_bwd.log" 2>&1
    grep -v Warn "$OUT/scan_bwd.log" | tail -6
    serve_here ;;
  train21)  # the 1.5B training step at the final scan backward (lane sums + loads a step ahead): both
            # models and `falcon-mamba train`, one more step of each under torch.profiler; then
            # `bench prefill` (2k / 16k against the Mistral-7B shape) in what is left
    timeout $(left 170) python3 benchmarks/bench_train.py --shape 1.5b --models mamba,transformer --profile \
      --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "^\||x \(target|rate|benchmark:" "$OUT/train.log"
    timeout $(left 5) python3 -m falcon_mamba bench prefill --out "$OUT/results" > "$OUT/prefill.log" 2>&1
    grep -E "prefill|target|ceiling" "$OUT/prefill.log" ;;
  norm21)  # the training norm's Triton backward (block norm, dt/B/C norms into x_proj's gradient) and
           # x_proj's input gradient added by addmm: their cuda tests, the forward scan's length chunk
           # at the training shape, then the 1.5B Mamba step (profiled)
    cuda_tests 150 tests/test_triton_norm_bwd.py tests/test_triton_norm_autograd.py tests/test_mixer_autograd.py
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6
    timeout 60 python3 benchmarks/bench_scan_fwd.py --shapes "train 8x2048" \
      --variants 32:4:1,32:4:1:2048,32:4:1:1024,32:4:1:512,32:4:1:128,32:2:1:2048 > "$OUT/scan_fwd.log" 2>&1
    grep "^shape" "$OUT/scan_fwd.log"
    timeout $(left 5) python3 benchmarks/bench_train.py --shape 1.5b --models mamba --no-cli --profile \
      --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "^\||rate" "$OUT/train.log"; grep -A22 "one step under" "$OUT/train.log" | cut -c1-70,140-175 ;;
  ce21)  # the loss's softmax step as one kernel (ops/triton_ce.py): its cuda tests and the norm
         # backward's; the forward scan's unroll x length chunk at the training shape; the 1.5B
         # Mamba step (profiled)
    cuda_tests 120 tests/test_linear_ce.py tests/test_triton_norm_bwd.py
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6
    timeout 80 python3 benchmarks/bench_scan_fwd.py --shapes "train 8x2048" \
      --variants 32:2:1,32:2:1:2048,32:1:1:2048,32:2:1:1024,32:2:1:512,32:4:1:256,64:2:2:2048 > "$OUT/scan_fwd.log" 2>&1
    grep "^shape" "$OUT/scan_fwd.log"
    timeout $(left 5) python3 benchmarks/bench_train.py --shape 1.5b --models mamba --no-cli --profile \
      --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "^\||rate" "$OUT/train.log"; grep -A30 "one step under" "$OUT/train.log" | cut -c1-70,140-175 ;;
  step21)  # the cuda tests of the loss kernel, the norm backward and the scan forward; the 1.5B Mamba
           # step (profiled)
    cuda_tests 150 tests/test_linear_ce.py tests/test_triton_norm_bwd.py tests/test_triton_scan.py -k "not backward and not past"
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6
    timeout $(left 5) python3 benchmarks/bench_train.py --shape 1.5b --models mamba --no-cli --profile \
      --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "^\||rate|Error|error" "$OUT/train.log" | head; grep -A30 "one step under" "$OUT/train.log" | cut -c1-70,140-175 ;;
  train22)  # the training add + norm Function, the loss kernel, the norm backward: their cuda tests (and
            # the fused mixer's on the GPU); then the 1.5B step, both models and `falcon-mamba train`,
            # each model profiled
    cuda_tests 120 tests/test_triton_norm_bwd.py tests/test_mixer_autograd.py tests/test_linear_ce.py
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6
    timeout $(left 5) python3 benchmarks/bench_train.py --shape 1.5b --models mamba,transformer --profile \
      --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "^\||x \(target|rate|benchmark:|Error" "$OUT/train.log"; grep -A30 "mamba: one step under" "$OUT/train.log" | cut -c1-70,140-175 ;;
  final22)  # session 18's final code (8d5ee15; its --switch-interval-ms was removed after this run: no
            # gain): the training cuda tests again (the add + norm per block), the 1.5B
            # Mamba step; the server at 64 / 256 clients with the 0.5 ms switch interval, then 0.1 ms
    cuda_tests 110 tests/test_triton_norm_bwd.py tests/test_mixer_autograd.py tests/test_linear_ce.py
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6
    timeout 100 python3 benchmarks/bench_train.py --shape 1.5b --models mamba --no-cli \
      --out "$OUT/results" > "$OUT/train.log" 2>&1
    grep -E "^\| Falcon|rate" "$OUT/train.log"
    timeout $(left 150) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 256 --sweep 64,256 --max-tokens 128 \
      --temperature 0 --procs 8 --out "$OUT/serve.json" > "$OUT/bench.log" 2>&1
    grep -v "^{" "$OUT/bench.log" | head -24
    timeout $(left 5) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 256 --sweep 64,256 --max-tokens 128 \
      --temperature 0 --procs 8 --server-arg=--switch-interval-ms=0.1 --out "$OUT/serve-switch01.json" \
      > "$OUT/bench-switch01.log" 2>&1
    grep -v "^{" "$OUT/bench-switch01.log" | head -24 ;;
  fwd22)  # the training forward scan's one pass against the default chunks, on the bench's inputs and
          # on the training step's own layout and data (train-step: why one pass was 2.7 ms in the step)
    timeout $(left 5) python3 benchmarks/bench_scan_fwd.py --shapes "train 8x2048,train-step 8x2048" \
      --variants 32:4:1,32:2:1:2048 > "$OUT/scan_fwd.log" 2>&1
    grep "^shape" "$OUT/scan_fwd.log"; grep -i error "$OUT/scan_fwd.log" | head -3 ;;
  pf23)  # the scan backward's h_{t-1} loaded a step ahead (BWD_PREFETCH_H, prepared in session 18, off):
         # bench_scan_bwd.py with it on (as the --old file) against the default in one call, then the
         # scan backward's cuda tests
    sed 's/^BWD_PREFETCH_H = False/BWD_PREFETCH_H = True/' falcon_mamba/ops/triton_scan_bwd.py > .data/pf_bwd.py
    grep -q "^BWD_PREFETCH_H = True" .data/pf_bwd.py || echo "pf23: the switch was not found" >> "$OUT/env.txt"
    timeout 150 python3 benchmarks/bench_scan_bwd.py --old .data/pf_bwd.py > "$OUT/scan_bwd.log" 2>&1
    grep -v Warn "$OUT/scan_bwd.log" | tail -4
    cuda_tests $(left 5) tests/test_triton_scan.py -k "backward_cuda"
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6 ;;
  ahead20)  # the reverse step's x, dt, B and C loaded a step ahead: bench_scan_bwd.py against the lane
            # sums alone (.data/old_bwd.py: git show 749e76a:falcon_mamba/ops/triton_scan_bwd.py),
            # then the scan backward's cuda tests in what is left
    timeout 150 python3 benchmarks/bench_scan_bwd.py --old .data/old_bwd.py > "$OUT/scan_bwd.log" 2>&1
    grep -v Warn "$OUT/scan_bwd.log" | tail -4
    cuda_tests $(left 5) tests/test_triton_scan.py -k "backward_cuda"
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -6 ;;
  final18|final19)  # the whole cuda suite (300 s), then the server at 64 / 256 clients (fp32 states).
            # final18 (session 16's first call): the conv step's 512 x 8 launch; final19 (session 17's
            # first call; the engine and server files not run since 5bfdc65): the pool's scratch
            # moves, whose step log's release phase tells whether the 20-75 ms stalls were the allocator
    cuda_tests 300 tests/
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -6
    serve_here ;;
  conv17)  # the conv step's launch shapes inside the decode step (64 / 256 rows), after its cuda tests
    cuda_tests 45 tests/test_triton_decode.py -k "conv_step"
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -3
    timeout $(left 5) python3 benchmarks/sweep_step_kernels.py --kernel conv --state-dtypes float32 \
      --out "$OUT/results/sweep-conv.json" > "$OUT/bench.log" 2>&1 ;;
  check17)  # the decode-graph cuda tests on the bucket autotune and the forced batched modes
    cuda_tests $(left 5) tests/test_decode_graphs.py -k "bucket or batched or forced or graphs_match"
    grep -E "passed|failed|FAILED|ERROR|^exit|^E " "$OUT/tests.txt" | tail -12 ;;
  serve17)  # the decode-graph and warm-up cuda tests (the per-bucket cublas / cublas_lt autotune); the
            # server at 64 / 256 clients with fp32, then bf16 states; the 64- / 256-row step's kernels
    cuda_tests 90 tests/test_decode_graphs.py tests/test_warm_up.py
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -4
    timeout $(left 240) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 256 --sweep 64,256 --max-tokens 128 \
      --temperature 0 --procs 8 --out "$OUT/serve.json" > "$OUT/bench.log" 2>&1
    timeout $(left 60) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 256 --sweep 64,256 --max-tokens 128 \
      --temperature 0 --procs 8 --server-arg=--state-dtype=bfloat16 --out "$OUT/serve-bf16.json" \
      > "$OUT/bf16.log" 2>&1
    cat "$OUT/bf16.log" >> "$OUT/bench.log"
    timeout $(left 5) python3 benchmarks/profile_decode.py --layers 16 --formats bf16 --batches 64,256 \
      --out "$OUT/results/profile-decode.json" > "$OUT/profile.log" 2>&1
    grep -E "^==|us/layer +16.0 launches" "$OUT/profile.log" | head -30
    grep -v "^{" "$OUT/bench.log" ;;
  gemm17)  # the decode projections through other cuBLAS entry points; the scan forward's launches at the
           # prompt bursts' shapes (16 / 64 x 32)
    timeout $(left 200) python3 benchmarks/bench_decode_gemms.py --out "$OUT/results/decode-gemms.json" \
      > "$OUT/bench.log" 2>&1
    timeout $(left 5) python3 benchmarks/bench_scan_fwd.py --shapes 16x32,64x32 \
      --variants 32:4:1,32:2:1,32:8:1,16:4:1,16:8:1,64:4:2,64:8:2,64:4:1,128:4:4,128:8:4 > "$OUT/scan.log" 2>&1
    grep -v "^{" "$OUT/scan.log" | tail -30 ;;
  ssm17)  # the many-row SSM update's launch shapes inside the decode step (64 / 256 rows, fp32 and bf16
          # states), then each kernel of a 16 x 32 prompt-graph replay (16 layers)
    timeout $(left 150) python3 benchmarks/sweep_step_kernels.py --out "$OUT/results/sweep-ssm-rows.json" \
      > "$OUT/bench.log" 2>&1
    timeout $(left 5) python3 benchmarks/profile_prefill.py --layers 16 --batches 64x32,16x32 --profile \
      --out "$OUT/results/prefill-batches.json" > "$OUT/prefill.log" 2>&1
    grep -v "^{" "$OUT/prefill.log" | head -40 ;;
  final16)  # the whole cuda suite (330 s), then the 64- and 256-row decode steps' kernels with fp32
            # and with bf16 SSM states (16 layers); the 64-client server run with bf16 states again
    cuda_tests 330 tests/
    grep -E "passed|failed|FAILED|ERROR|^exit" "$OUT/tests.txt" | tail -6
    for sd in float32 bfloat16; do
      timeout $(left 5) python3 benchmarks/profile_decode.py --layers 16 --formats bf16 --batches 64,256 \
        --state-dtype $sd --out "$OUT/results/profile-decode-$sd.json" >> "$OUT/bench.log" 2>&1
    done
    timeout $(left 5) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 256 --sweep 64 --max-tokens 128 \
      --temperature 0 --procs 8 --server-arg=--state-dtype=bfloat16 --out "$OUT/serve-bf16-64.json" \
      > "$OUT/bf16.log" 2>&1
    grep -v "^{" "$OUT/bf16.log" | head -12 ;;
  serve11)  # the server: 1 / 16 / 64 / 256 clients and the mixed load
    timeout $((${LIMIT:-585} - 10 - SECONDS)) python3 benchmarks/load_test.py --random 7b \
      --tokenizer-dir .data/shared/tokenizers/falcon --slots 256 --sweep 1,16,64,256 --max-tokens 128 \
      --temperature 0 --mixed 32:100000 --procs 8 --out "$OUT/serve.json" > "$OUT/bench.log" 2>&1
    grep -v "^{" "$OUT/bench.log" ;;
  train18)
    timeout ${TRAIN_LIMIT:-585} python3 benchmarks/bench_train.py --shape 1.5b \
      --models ${TRAIN_MODELS:-mamba,mamba-plain,transformer} --out "$OUT/results" > "$OUT/bench.log" 2>&1 ;;
  chunk15)  # the inference scan's chunk per length (kernel_bench scaninfer), then `bench prefill`
    timeout $(left 150) python3 benchmarks/kernel_bench.py --parts scaninfer > "$OUT/scaninfer.log" 2>&1
    grep "^kernel" "$OUT/scaninfer.log" | grep -E "picked|chunk=(16|32|64|128|256) " | cut -c1-120
    timeout $(left 5) python3 -m falcon_mamba bench prefill --out "$OUT/results" > "$OUT/prefill.log" 2>&1
    grep -E "prefill|target|ceiling" "$OUT/prefill.log" ;;
  train7b)  # the 7B recipe's step (micro batch 1 x 2048, activation checkpointing), Mamba only
    timeout $(left 5) python3 benchmarks/bench_train.py --shape 7b --models mamba --no-cli \
      --out "$OUT/results" > "$OUT/bench.log" 2>&1 ;;
  profile)
    timeout 500 python3 benchmarks/profile_decode.py --layers 16 --out "$OUT/results/profile.json" \
      > "$OUT/bench.log" 2>&1 ;;
  *)
    echo "unknown mode $MODE" > "$OUT/bench.log" ;;
esac
tail -45 "$OUT/bench.log"
