#!/usr/bin/env bash
# Everything a GPU session checks, in one call, most valuable first, each step under its
# own time limit inside an overall budget so that a slow step cannot eat the rest:
#   gpu tests of the kernels and the model, the other kernel tests (their CPU-sized shapes
#   on CUDA tensors), every benchmark and a per-kernel profile of a decode step, a
#   loss-curve comparison, then tile/settings sweeps for the FFN, LayerNorm and attention.
#
#   bash bench/gpu_check.sh OUTDIR [BUDGET_SECONDS] [STEP...]
#
# With STEP names given, only those steps run (names as printed in the log). The step
# limits add up to ~31 minutes and a device command may run 10: a session splits them, e.g.
#   bash bench/gpu_check.sh "$OUT" 560 gpu-tests kernel-tests-on-cuda bench-ffn ffn-few-rows \
#       bench-attention bench-layer-norm
#   bash bench/gpu_check.sh "$OUT" 560 sampling-tests bench-sample bench-sampling profile-sample \
#       bench-train train-triton train-torch
# With one session's 15 minutes (the machine's start, ~30 s, included), run 7 ran three calls
# (395, 76 and 258 s), giving the machine back between them so that the code could change:
# a cold start costs ~30 s, and no machine starts with under 4 minutes left. Next (the
# training step's host time and the compiled step first, then the FFN's slow product):
#   bash bench/gpu_check.sh "$OUT" 420 gpu-tests ffn-profile bench-train bench-train-compile \
#       bench-attention-gqa
#   bash bench/gpu_check.sh "$OUT" 330 ffn-candidates bench-attention bench-attention-dropout \
#       bench-sampling ln-sweep
# then bench-sample, bench-attention-fused, ffn-few-rows and bench-train-small
# (bench-train prints each step's host time and, with --host-profile, where it goes;
# ffn-profile times each of the FFN's six products beside cuBLAS).
# Steps run in this file's order, whatever the order named: the LayerNorm sweep
# goes before the FFN's, whose warp-specialised candidates may take its whole limit.
# ws-check runs the warp-specialised FFN's gpu tests alone under a short limit: if they
# fail or hang, the FFN sweep leaves that candidate out rather than hang on it too.
# OUTDIR receives all.log (every step's full output) and plots.tar (bench/plots).
# Runs from the repository root with the machine's own torch and triton (PYTHONPATH=.).
# GPU_CHECK_DRY=1 runs nothing and prints each step's name and command, as if every step
# failed (so the fallbacks' flags show too): tests/test_bench.py checks, without a GPU,
# that every command parses and every pytest step selects tests.
set -u
out=${1:?usage: bash bench/gpu_check.sh OUTDIR [BUDGET_SECONDS]}
dry=${GPU_CHECK_DRY:-}
budget=${2:-540}
only=" ${*:3} "
mkdir -p "$out"
log="$out/all.log"
start=$(date +%s)
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 MPLBACKEND=Agg
unset TRITON_INTERPRET

rc=  # the exit status of the last step run
step() {  # name seconds command...
    local name=$1 limit=$2
    shift 2
    rc=
    if [[ "$only" != "  " && "$only" != *" $name "* ]]; then return; fi
    if [[ -n "$dry" ]]; then
        printf '%q ' "$name" "$@"; echo
        rc=1
        return
    fi
    local left=$((budget - ($(date +%s) - start)))
    ((limit > left)) && limit=$left
    if ((limit < 15)); then
        echo "== $name: not run (budget spent)" | tee -a "$log"
        return
    fi
    echo "== $name (limit ${limit}s, at $(($(date +%s) - start))s)" | tee -a "$log"
    timeout -k 5 "$limit" "$@" >>"$log" 2>&1
    rc=$?
    echo "== $name: exit $rc after $(($(date +%s) - start))s" | tee -a "$log"
}

[[ -n "$dry" ]] || {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
} >>"$log" 2>&1
[[ -n "$dry" ]] || tail -n 3 "$log"

ws_tests="warp-specialized"
step ws-check 90 python3 -m pytest -q -p no:cacheprovider -n 8 -W ignore -m gpu -k "$ws_tests" tests/test_ffn.py
no_ws=()
if [[ -n "$rc" && "$rc" != 0 ]]; then
    no_ws=(--no-warp-specialized)
    [[ -n "$dry" ]] || echo "== the warp-specialised FFN failed its tests: the FFN sweep leaves it out" | tee -a "$log"
fi
step gpu-tests 150 python3 -m pytest -q -p no:cacheprovider -n 8 -W ignore -m gpu -k "not ($ws_tests)" tests/test_ffn.py \
    tests/test_model_kernels.py tests/test_layer_norm.py tests/test_attention.py tests/test_decode_attention.py \
    tests/test_generate.py tests/test_sampling.py tests/test_cross_entropy.py
step sampling-tests 90 python3 -m pytest -q -p no:cacheprovider -n 8 -W ignore tests/test_sampling.py tests/test_generate.py
step kernel-tests-on-cuda 80 python3 -m pytest -q -p no:cacheprovider -n 8 -W ignore -m "not gpu" tests/test_ffn.py \
    tests/test_layer_norm.py tests/test_attention.py tests/test_decode_attention.py tests/test_model_kernels.py tests/test_sampling.py \
    tests/test_cross_entropy.py
step bench-ffn 90 python3 -m bench.bench_ffn
step ffn-few-rows 30 python3 -m bench.bench_ffn --few-rows
# Which kernel makes C = 768's forward+backward unsteady (0.59-0.83x eager across runs 5-6),
# or whether its launch path does: the host's time a pass beside the device's.
step ffn-profile 60 python3 -m bench.bench_ffn --profile 768
# The FFN candidates untimed so far, beside the table: the weight gradients with only the
# last round's tiles cut along K (C = 768: 12 of 144; GPT-2 large's 1280: 4 of 400), and
# the GELU epilogues on the hardware's approximate tanh.
step ffn-candidates 70 python3 -m bench.bench_ffn --sweep 768 1280 --only table "TMA + tail split" "TMA + approx GELU"
step bench-attention 130 python3 -m bench.bench_attention
# Training with attention dropout: ours (one Philox call for 8 scores, untimed so far) against SDPA's.
step bench-attention-dropout 60 python3 -m bench.bench_attention --dropout 0.1 --no-flex --head-dims 64
# q, k, v as the model passes them (strided views of its QKV projection); the table above
# times contiguous ones.
step bench-attention-fused 70 python3 -m bench.bench_attention --fused-qkv --head-dims 64 --no-flex
# Grouped-query attention (4 query heads a key/value head; untimed so far) beside SDPA's
# and FlexAttention's enable_gqa.
step bench-attention-gqa 100 python3 -m bench.bench_attention --gqa 4 --head-dims 128
# A causal sliding window of 1024 keys (untimed so far): the tiles out of every row's window
# skipped, beside FlexAttention's sliding-window block mask and SDPA's boolean mask.
step bench-attention-window 100 python3 -m bench.bench_attention --window 1024 --head-dims 128
step bench-layer-norm 60 python3 -m bench.bench_layer_norm
# The fused head and loss (untimed so far; "auto" takes it by its memory traffic) beside
# torch eager, torch.compile and Liger-Kernel's fused linear cross-entropy, with peak memory.
step bench-cross-entropy 90 python3 -m bench.bench_cross_entropy --tokens 4096 16384
step bench-train 70 python3 -m bench.bench_train --no-compile --steps 10 --burn-in 3 --host-profile
# torch.compile with our kernels as custom ops in its graph (untimed so far), beside compiled torch.
step bench-train-compile 200 python3 -m bench.bench_train --steps 10 --burn-in 3
# A small model, where launch cost rather than the kernels may decide what "auto" should run.
step bench-train-small 40 python3 -m bench.bench_train --preset shakespeare-char --batch-size 64 --no-compile \
    --steps 20 --burn-in 5
step bench-sample 150 python3 -m bench.bench_sample
step bench-sample-fast 60 python3 -m bench.bench_sample --skip fast-ffn compile cached uncached hf
step bench-sampling 90 python3 -m bench.bench_sampling
step profile-sample 60 python3 -m bench.bench_sample --profile
# The done-when of the kernel issues: training on the kernels follows the reference's curve.
for k in triton torch; do
    step "train-$k" 40 python3 train.py --preset shakespeare-char --dropout 0 --batch-size 32 --max-steps 300 \
        --lr 1e-3 --warmup 50 --eval-interval 150 --eval-iters 20 --log-interval 50 --seed 1 \
        --kernels "$k" --out-dir "/tmp/train-$k" --cache-dir /tmp/train-cache
done
# The forward's candidates (its own tiles, the persistent forward, which since run 7 holds
# weight and bias for its whole walk) from the widest, where the forward's 90%-of-copy target
# is still missed (run 7: 86% at N = 8192, 88% for the best tile swept); the backward's are tuned.
step ln-sweep 70 python3 -m bench.bench_layer_norm --sweep --forward-only --sizes 8192 4096 2048
step ffn-sweep 200 python3 -m bench.bench_ffn --sweep 768 1024 "${no_ws[@]}"
step attention-sweep 200 python3 -m bench.bench_attention --sweep
# The kernel tests with the Hopper variants forced on everywhere (tests/candidates.py).
step candidate-tests 100 python3 -m pytest -q -p no:cacheprovider -n 8 -W ignore -m "not gpu" --candidates \
    tests/test_ffn.py tests/test_attention.py tests/test_layer_norm.py

[[ -n "$dry" ]] && exit 0
tar -cf "$out/plots.tar" bench/plots 2>/dev/null
# The tables and outcomes, for the reply's tail.
grep -E '^(==|\||###|_|[0-9]+ (passed|failed)|FAILED|ERROR|.*skipped)' "$log" | grep -v '^|---' | tail -c 11000
