#!/usr/bin/env bash
# All that a session with a GPU runs, in one command that fits a 15-minute lease with its start-up: the steps'
# timeouts sum to 580 s (the device tool allows 600 s per command), a typical run ~8 min. No install, no network:
# the python that holds torch+triton (PY, default python3) runs the repo from PYTHONPATH.
#   STEPS="check tune bench profile" bash benchmarks/gpu_session.sh        (the default: all four, in this order)
# Steps, with their estimated wall time on an H100 with a cold Triton cache (most of check is compiling):
#   setup     ~10 s               the card, torch and triton versions
#   check     ~110 s (110+60+50 s) benchmarks.gpu_check: bf16 forward+backward of ops.moe_mlp on each engine forced
#                                 (torch, tma, triton) at Mixtral and Qwen3-30B-A3B sizes, most experts empty, pairs
#                                 dropped by a capacity, against float64 on the GPU; then the GPU tests
#                                 tests/triton/test_expert_mlp.py::test_bf16_at_real_sizes_on_gpu and
#                                 tests/triton/test_quantized.py (FP8 / MXFP4 experts, FP8 x FP8, graph capture),
#                                 and the two-launch decode's GPU tests (tests/triton/test_expert_mlp_decode.py:
#                                 Mixtral sizes against float64, two kernels a step, CUDA graph replays)
#   tune      ~140 s (150 s)      moe_kernels.tools.tune_gemm (--budget 120 s): engine per role, tiles and the
#                                 decode path (split kernels or two launches, at T = 1, 8, 64), written
#                                 into moe_kernels/triton/configs/ (read by bench and profile) and copied to $OUT
#   bench     ~140 s (170 s)      expert_mlp at Mixtral T16384, Qwen3-30B-A3B T32768, OLMoE T16384, DeepSeek-V3
#                                 T4096 (fwd, fwd+bwd) and Mixtral decode T1/T4/T8 against torch grouped_mm,
#                                 transformers and the dense cuBLAS rate; Mixtral decode with bf16 / FP8 / MXFP4
#                                 weights against the copy rate of their bytes, each decode case also with
#                                 MOE_KERNELS_DECODE=fused ("ours two-launch decode"); the OLMoE LoRA step against PEFT
#                                 (when peft is installed); the soft_moe cases
#   profile   ~25 s  (40 s)       per-kernel CUDA time of Mixtral T16384 forward+backward and each role's engine
# Output goes to $OUT (default benchmarks/results/gpu-session): while it runs, plain files under $OUT/session
# (returned even if the command is killed); at the end one archive $OUT/gpu-session.tgz and $OUT/summary.md. The
# summary is also the last thing on stdout. Per-step timeouts: CHECK_TIMEOUT, TEST_TIMEOUT, DECODE_TEST_TIMEOUT,
# TUNE_TIMEOUT (and TUNE_BUDGET), BENCH_TIMEOUT, PROFILE_TIMEOUT; BENCH_ARGS adds arguments to the suite.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu-session}
S="$OUT/session"
mkdir -p "$S/configs"
PY=${PY:-python3}
STEPS=${STEPS:-check tune bench profile}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_KERNELS_BUILD_NATIVE=0
unset TRITON_INTERPRET MOE_KERNELS_GEMM_ENGINE MOE_KERNELS_GEMM_CONFIG MOE_KERNELS_TN_CONFIG MOE_KERNELS_TMA_CONFIG \
      MOE_KERNELS_TN_TMA_CONFIG
SUM="$S/summary.md"
T0=$SECONDS
has() { [[ " $STEPS " == *" $1 "* ]]; }
begin() { echo "== $1 at $((SECONDS - T0)) s" | tee -a "$SUM"; }
finish() {   # the archive and the summary, also when a step's failure or a signal ends the script
  echo "== done at $((SECONDS - T0)) s (steps: $STEPS)" >> "$SUM"
  cp "$SUM" "$OUT/summary.md"
  tar czf "$OUT/gpu-session.tgz" -C "$S" . && rm -rf "$S"
  echo; echo "################ summary (also $OUT/summary.md; everything in $OUT/gpu-session.tgz)"
  cat "$OUT/summary.md"
}
trap finish EXIT
trap 'exit 143' TERM INT

$PY -c "import torch, triton; print('#', torch.cuda.get_device_name(), '| torch', torch.__version__, '| triton',
triton.__version__, '| cuda', torch.version.cuda)" | tee "$SUM" || exit 1
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")

if has check; then
  begin check
  timeout -k 5 "${CHECK_TIMEOUT:-110}" $PY -m benchmarks.gpu_check > "$S/check.log" 2>&1
  echo "gpu_check exit $?" >> "$SUM"
  grep -E "^(FAIL|gpu_check:)" "$S/check.log" | cut -c1-400 >> "$SUM"
  grep -q "^gpu_check:" "$S/check.log" || tail -5 "$S/check.log" | cut -c1-300 >> "$SUM"
  timeout -k 5 "${TEST_TIMEOUT:-60}" $PY -m pytest "tests/triton/test_expert_mlp.py::test_bf16_at_real_sizes_on_gpu" \
      tests/triton/test_quantized.py -q -p no:cacheprovider -rs > "$S/tests.log" 2>&1
  echo "GPU tests (bf16 at real sizes, quantized experts) exit $?: $(tail -1 "$S/tests.log")" >> "$SUM"
  grep -E "^(FAILED|ERROR)" "$S/tests.log" | cut -c1-300 >> "$SUM"
  timeout -k 5 "${DECODE_TEST_TIMEOUT:-50}" $PY -m pytest tests/triton/test_expert_mlp_decode.py -q -p no:cacheprovider \
      -rs -k "on_gpu" > "$S/tests-decode.log" 2>&1
  echo "GPU tests (two-launch decode: real sizes, two kernels, CUDA graph) exit $?: $(tail -1 "$S/tests-decode.log")" \
      >> "$SUM"
  grep -E "^(FAILED|ERROR)" "$S/tests-decode.log" | cut -c1-300 >> "$SUM"
  tail -2 "$SUM"
fi

if has tune; then
  begin tune
  timeout -k 5 "${TUNE_TIMEOUT:-150}" $PY -m moe_kernels.tools.tune_gemm --budget "${TUNE_BUDGET:-120}" \
      --out moe_kernels/triton/configs > "$S/tune.log" 2>&1
  rc=$?
  files=$(sed -n 's/^wrote //p' "$S/tune.log")
  for f in $files; do cp "$f" "$S/configs/"; done
  echo "tune_gemm exit $rc, $(echo $files | wc -w) data files (in configs/ of the archive)" | tee -a "$SUM"
  grep -E "^(\||note:|tune_gemm:|Times include)" "$S/tune.log" >> "$SUM"
fi

if has bench; then
  begin bench
  timeout -k 5 "${BENCH_TIMEOUT:-170}" $PY -m benchmarks --device cuda --no-memory --no-plots --out "$S" \
      --only "Mixtral T16384-" "Qwen3-30B-A3B T32768-" "OLMoE T16384-" "DeepSeek-V3 T4096-" "Mixtral T1-" \
      "Mixtral T4-" "Mixtral T8-" "Mixtral bf16-w T1-" "Mixtral bf16-w T8-" "Mixtral fp8-w T8-" \
      "Mixtral mxfp4-w T8-" "OLMoE LoRA-r16" soft_moe ${BENCH_ARGS:-} > "$S/bench-$card.log" 2>&1
  echo "bench exit $?" | tee -a "$SUM"
  json=$(ls "$S"/*.json 2>/dev/null | head -1)
  if [[ -n "$json" ]]; then
    $PY -c "import json, sys; from benchmarks import bench_expert_mlp as b
print(b.peer_table(json.load(open(sys.argv[1]))['rows']))" "$json" >> "$SUM"
  fi
  sed -n '/^## acceptance targets/,/^wrote /p' "$S/bench-$card.log" | grep "^|" >> "$SUM"
  sed -n '/^## summary (ours)/,/^wrote /p' "$S/bench-$card.log" | grep -E "^\| (soft_moe )?(SoftMoE|DynamicSlots)" >> "$SUM"
  grep "^note: " "$S/bench-$card.log" | cut -c1-240 | head -8 >> "$SUM"
  [[ -n "$json" ]] || tail -5 "$S/bench-$card.log" | cut -c1-300 >> "$SUM"
fi

if has profile; then
  begin profile
  timeout -k 5 "${PROFILE_TIMEOUT:-40}" $PY -m benchmarks.profile_expert_mlp --shape Mixtral > "$S/profile.log" 2>&1
  echo "profile exit $?" | tee -a "$SUM"
  { grep -E "^(Mixtral|engines:)" "$S/profile.log"; sed -n '/^ours:/,/^engines:/p' "$S/profile.log" \
      | grep -v "^engines:" | head -9
    grep -A1 "^torch grouped_mm layer:" "$S/profile.log"; } | cut -c1-160 >> "$SUM"
  grep -q "^engines:" "$S/profile.log" || tail -3 "$S/profile.log" | cut -c1-300 >> "$SUM"
fi
