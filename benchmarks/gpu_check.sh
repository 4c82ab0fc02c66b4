#!/usr/bin/env bash
# One-call GPU check (issue 10): nanoGPT's bench.py and ours on the same GPU, the optimizer step,
# rotation-metrics cost, peak memory and the realistic recipe, as one markdown report that ends in
# one table of the issue's figures against their goals.
#
#   mkdir -p .gpu/nanogpt && cp ../shared/anchors/nanogpt/* .gpu/nanogpt/   # bench.py, model.py, configurator.py
#   bash benchmarks/gpu_check.sh [OUT_DIR]                                    # ~7-8 min on an H200
#   SECTIONS="1 2" bash benchmarks/gpu_check.sh                               # some sections only
#   GPU_TESTS= bash benchmarks/gpu_check.sh       # section 0 without tests/test_loss.py (~30 s less)
#
# Section 7 (the pre-issue-10 "before" rows, ~1 min) runs only when named: its figures are in
# benchmarks/RESULTS.md already (run 1), and without it one call stays within 8 minutes.
# Section 8 (an experiment: SDPA's flash kernel instead of cuDNN's, ~1.5 min) likewise.
#
# Needs torch, transformers and Triton only (no installs, no network): run from the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/gpu_check}}
mkdir -p "$out"
report="$out/gpu_check.md"
export PYTHONPATH=. HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
py=${PYTHON:-python3}
sections=" ${SECTIONS:-0 1 2 3 4 5 6} "

want() { [[ "$sections" == *" $1 "* ]]; }
section() { printf '\n## %s\n\n' "$1" | tee -a "$report"; echo "(started at ${SECONDS}s)" >>"$report"; }
run() {  # run LIMIT_S CMD...: the command's output into the report; a failure is reported, not fatal
  local limit=$1; shift
  echo "\`$*\`" | tee -a "$report"
  echo | tee -a "$report"
  timeout "$limit" "$@" 2>"$out/last_stderr.txt" | grep -v '^[0-9]*/[0-9]* loss' | tee -a "$report"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -eq 0 ] || { echo "FAILED rc=$rc: $(tail -5 "$out/last_stderr.txt" | tr '\n' ' ')" | tee -a "$report"; }
}

: >"$report"
section "Device"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $py -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
} | tee -a "$report"

if want 0; then
  section "0. GPU tests: the compiled kernels against the eager paths (AdamW cases; CI covers every rule in the interpreter)"
  run 240 $py -m pytest -q -p no:cacheprovider tests/test_optim_fused.py tests/test_metrics_fused_sums.py \
    tests/test_metrics_training.py tests/test_metrics_layer_sums.py tests/test_step_on_device.py \
    tests/test_kernel_codegen.py::test_the_offline_compile_is_the_jits_own \
    tests/test_rope.py::test_the_table_is_transformers_own_bit_for_bit \
    ${GPU_TESTS-tests/test_loss.py} -k "not lion and not sgdm and not training_with_the_queued"
fi

if want 1; then
  section "1. nanoGPT bench.py (GPT-2 124M, bias off, fused AdamW, compile, 16 x 1024, vocab 50304)"
  if [ -f .gpu/nanogpt/bench.py ]; then
    (cd .gpu/nanogpt && run 240 $py bench.py --real_data=False --batch_size=16 --compile=True --profile=False)
  else
    echo "missing .gpu/nanogpt (see the header of this script)" | tee -a "$report"
  fi
fi

if want 2; then
  section "2. Ours, configs/gpt2-124m.yaml, compile, 16 x 1024, vocab 50304 (rows vs the first: adamw, no metrics)"
  run 300 $py benchmarks/bench_mfu.py --config configs/gpt2-124m.yaml --device cuda --precision bf16 --compile \
    --micro-batch 16 --seq-len 1024 --vocab 50304 --steps 20 --warmup 6 \
    --optims adamw,rv-adamw,rv-lion,adamw-plain --rotation-every 0,1,10 --profile "$out/profile_gpt2.txt" \
    --trace "$out/trace_gpt2.json.gz" --profile-steps 3 --profile-rows 0,1
  run 60 $py benchmarks/trace_gaps.py "$out/trace_gpt2.row0.json.gz" --top 15   # adamw, no metrics
  run 60 $py benchmarks/trace_gaps.py "$out/trace_gpt2.row1.json.gz" --top 10   # adamw, rotation_every=1
fi

if want 4; then
  section "4. Optimizer step alone, llama-125m parameter set (and its row tiles); then GPT-2 124M's (Conv1D: column neurons); then the metric sums' tiles"
  run 180 $py benchmarks/bench_optim_gpu.py --reps 40 \
    --names torch-fused,adamw,adamw:eager,rv-adamw,rv-adamw:eager,rv-adamw+sums,lion,lion:eager,rv-lion,rv-lion:eager,sgdm,rv-sgdm,rv-adamw@r4096x8,rv-adamw@r2048x4,rv-adamw@r1024x4,rv-adamw@r4096x16,rv-adamw@r8192x16
  run 120 $py benchmarks/bench_optim_gpu.py --set gpt2 --reps 30 \
    --names torch-fused,adamw,rv-adamw,rv-adamw+sums,rv-lion,rv-adamw@8x256x8,rv-adamw@16x256x8,rv-adamw@4x1024x8,rv-adamw@8x1024x8,rv-adamw@8x1024x16,rv-adamw@8x1024x32,rv-adamw@4x1024x16
  run 90 $py benchmarks/bench_sums_gpu.py --set gpt2 --reps 30 --tiles default,8x256x8,8x256x4,16x128x8,4x512x8
fi

if want 3; then
  section "3. Ours, configs/llama-125m.yaml, compile, 32 x 1024: MFU and peak memory"
  run 300 $py benchmarks/bench_mfu.py --config configs/llama-125m.yaml --device cuda --precision bf16 --compile \
    --micro-batch 32 --seq-len 1024 --steps 15 --warmup 6 --optims adamw,rv-adamw --profile "$out/profile_llama.txt"
fi

if want 7; then
  section "7. Before: section 3 with the pre-issue-10 loss (compiled model, fp32 logits, eager loss) and eager RV step"
  run 300 $py benchmarks/bench_mfu.py --config configs/llama-125m.yaml --device cuda --precision bf16 --compile \
    --loss plain --micro-batch 32 --seq-len 1024 --steps 8 --warmup 4 --optims adamw,rv-adamw:eager
fi

if want 6; then
  section "6. The realistic recipe: configs/gpt2-124m.yaml as shipped (16 x 1024 x 32 accumulation = 0.5M tokens/step)"
  run 300 $py benchmarks/bench_mfu.py --config configs/gpt2-124m.yaml --device cuda --precision bf16 --compile \
    --micro-batch 16 --seq-len 1024 --grad-accum 32 --vocab 50304 --steps 2 --warmup 1 --optims adamw,rv-adamw \
    --rotation-every 10
fi

if want 5; then
  section "5. Rotation metrics, llama-125m 16 x 512 eager (the issue's setting)"
  run 200 $py benchmarks/bench_mfu.py --config configs/llama-125m.yaml --device cuda --precision bf16 \
    --micro-batch 16 --seq-len 512 --steps 15 --warmup 8 --optims rv-adamw,adamw --rotation-every 0,1,10
fi

if want 8; then
  section "8. Attention kernel: sections 2 and 3's adamw rows with SDPA's flash kernel instead of cuDNN's"
  run 150 $py benchmarks/bench_mfu.py --config configs/gpt2-124m.yaml --device cuda --precision bf16 --compile \
    --micro-batch 16 --seq-len 1024 --vocab 50304 --steps 15 --warmup 6 --optims adamw --sdpa flash
  run 150 $py benchmarks/bench_mfu.py --config configs/llama-125m.yaml --device cuda --precision bf16 --compile \
    --micro-batch 32 --seq-len 1024 --steps 10 --warmup 6 --optims adamw --sdpa flash
fi

section "Summary: issue 10's figures from this report (benchmarks/gpu_summary.py)"
$py benchmarks/gpu_summary.py "$report" | tee -a "$report"  # reads the whole report before it appends

echo "report: $report"
