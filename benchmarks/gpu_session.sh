#!/usr/bin/env bash
# All that a session with a GPU runs, in one call: the Triton tests at real sizes in bf16 (the interpreter
# cannot check bf16), then the GPU benchmarks. Logs, JSON and Markdown go to $OUT (default benchmarks/results);
# commit the results under benchmarks/results/ with the card's name.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
if ! make build > /tmp/moe_kernels-build.log 2>&1; then tail -60 /tmp/moe_kernels-build.log; exit 1; fi
PY=.venv/bin/python
card=$($PY -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
echo "card: $card"
$PY -m pytest tests/triton tests/nn -q -p no:cacheprovider -rs > "$OUT/tests-$card.log" 2>&1
echo "tests exit $?: $(tail -1 "$OUT/tests-$card.log")"
$PY -m benchmarks.bench_expert_mlp --device cuda --out "$OUT" > /tmp/expert_mlp.log 2>&1 || tail -30 /tmp/expert_mlp.log
{ $PY -m benchmarks.bench_routing --device cuda; echo; $PY -m benchmarks --device cuda --out "$OUT"; } \
    > "$OUT/routing-and-modules-$card.md" 2>&1
tail -40 "$OUT/routing-and-modules-$card.md"
cat "$OUT"/expert_mlp-*.md 2>/dev/null
