#!/usr/bin/env bash
# All that a session with a GPU runs, in one call: the Triton tests on the GPU (every tensor on CUDA, bf16 at
# real sizes included), the GEMM tile tuner, then the GPU benchmarks. Uses the python that holds torch+triton
# (PY, default python3) with the repo on PYTHONPATH: no install, no network. Logs, tuned configs, JSON and
# Markdown go to $OUT (default benchmarks/results); commit them under benchmarks/results/ with the card's name.
#   STEPS="tests props profile tune bench" bash benchmarks/gpu_session.sh
# bench: the whole suite on the GPU (python -m benchmarks --device cuda; BENCH_ARGS="--quick" or "--only
# expert_mlp" to narrow it), each family also runnable alone as python -m benchmarks.bench_<family>.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST=${OUT:-benchmarks/results}
OUT=$(mktemp -d)    # everything lands here, then one archive goes to DEST (a lease returns at most 8 files)
trap 'tar czf "$DEST/gpu-session.tgz" -C "$OUT" . && echo "archived to $DEST/gpu-session.tgz"' EXIT
PY=${PY:-python3}
STEPS=${STEPS:-tests profile tune bench}
mkdir -p "$DEST"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MOE_KERNELS_BUILD_NATIVE=0
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))") || exit 1
$PY -c "import torch, triton; print('card', torch.cuda.get_device_name(), 'torch', torch.__version__, 'triton', triton.__version__)"
has() { [[ " $STEPS " == *" $1 "* ]]; }
if has tests; then
  xdist=$($PY -c "import xdist" 2>/dev/null && echo "-n 8")
  MOE_KERNELS_TEST_DEVICE=cuda timeout ${TEST_TIMEOUT:-220} $PY -m pytest tests/triton tests/nn -q -p no:cacheprovider \
      -rs $xdist > "$OUT/tests-$card.log" 2>&1
  echo "tests exit $?:"; grep -E "^(FAILED|ERROR)" "$OUT/tests-$card.log" | cut -c1-200 | head -40; tail -1 "$OUT/tests-$card.log"
fi
if has props; then  # the property tests' triton half and the CUDA-graph capture, with the tensors they choose
  timeout ${PROPS_TIMEOUT:-120} $PY -m pytest tests/triton/test_graph.py tests/test_determinism.py tests/test_properties.py \
      -k "triton or graph or gpu" \
      -q -p no:cacheprovider -rs > "$OUT/props-$card.log" 2>&1
  echo "props exit $?:"; grep -E "^(FAILED|ERROR|E  )" "$OUT/props-$card.log" | cut -c1-200 | head -30; tail -1 "$OUT/props-$card.log"
fi
if has profile; then
  for shape in Mixtral Qwen3-30B-A3B; do
    timeout 90 $PY -m benchmarks.profile_expert_mlp --shape $shape 2>&1 | tee -a "$OUT/profile-$card.log"
  done
fi
if has tune; then
  timeout ${TUNE_TIMEOUT:-200} $PY -m moe_kernels.tools.tune_gemm --out moe_kernels/triton/configs > "$OUT/tune-$card.log" 2>&1
  echo "tune exit $?"; grep "^|" "$OUT/tune-$card.log"; cp moe_kernels/triton/configs/*.json "$OUT/" 2>/dev/null
fi
if has bench; then
  timeout ${BENCH_TIMEOUT:-300} $PY -m benchmarks --device cuda --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench-$card.log" 2>&1
  echo "bench exit $?"; sed -n '/^## summary/,$p' "$OUT/bench-$card.log" | head -60
fi
