#!/usr/bin/env bash
# The published rerankers, reproduced in one command, and the kernel latency table, in one report.
#
#   eval/gpu/reproduce.sh [OUT]                  on a GPU machine with hub access (the checkpoints download
#                                                 once into the Hugging Face cache; DL19 is read from
#                                                 $STREAMRANK_DATASETS, DL20 too where a copy lies there)
#   REPRODUCE_TINY=1 eval/gpu/reproduce.sh OUT   CPU smoke run: tiny random stand-ins for every checkpoint
#                                                 (eval/gpu/make_tiny_models.py), REPRODUCE_LIMIT queries
#                                                 (default 2), kernels-latency --quick on the Triton interpreter
#
# Runs `streamrank eval --check --table eval/reproducibility-published.toml` (configs/published/*.toml: FIRST /
# FirstMistral, RankZephyr, E2Rank-0.6B, Qwen3-Reranker-0.6B, the MiniLM cross-encoder; a row whose model or
# dataset cannot be had is SKIPped with the reason) and `streamrank bench kernels-latency`, then writes
# OUT/report.md (machine, versions, commit, both tables, exit codes). Exit status: non-zero if either failed.
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
OUT=${1:-$ROOT/logs/published-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
export STREAMRANK_DATASETS=${STREAMRANK_DATASETS:-$ROOT/../shared/datasets}
export STREAMRANK_HOME=${STREAMRANK_HOME:-$ROOT/.streamrank}
cd "$ROOT"

check_args=()
bench_args=()
mode="GPU, published checkpoints"
if [ "${REPRODUCE_TINY:-0}" = 1 ]; then
  mode="CPU smoke run, tiny random stand-ins (figures meaningless)"
  export STREAMRANK_MODELS="$OUT/tiny-models" STREAMRANK_OFFLINE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} CUDA_VISIBLE_DEVICES=""
  "$PY" eval/gpu/make_tiny_models.py "$STREAMRANK_MODELS" || exit 1
  check_args=(--limit "${REPRODUCE_LIMIT:-2}")
  bench_args=(--quick)
fi

started=$(date -u +%s)
"$PY" -m streamrank eval --check --table eval/reproducibility-published.toml --output "$OUT/check" \
  "${check_args[@]}" >"$OUT/check.log" 2>&1
check_rc=$?
"$PY" -m streamrank bench kernels-latency --output "$OUT/kernels" "${bench_args[@]}" >"$OUT/kernels.log" 2>&1
bench_rc=$?
seconds=$(( $(date -u +%s) - started ))

{
  echo "# Published rerankers and kernel latency"
  echo
  echo "- mode: $mode"
  echo "- date: $(date -u +%Y-%m-%dT%H:%M:%SZ), wall time ${seconds} s"
  echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- machine: $(nvidia-smi -L 2>/dev/null | head -1 || true) $(nproc) CPU cores"
  echo "- versions: $("$PY" -c 'import torch, transformers; print(f"torch {torch.__version__}, transformers {transformers.__version__}, CUDA {torch.cuda.is_available()}")' 2>/dev/null)"
  echo
  echo "## streamrank eval --check --table eval/reproducibility-published.toml ${check_args[*]} (exit $check_rc)"
  echo
  if [ -f "$OUT/check/reproducibility.md" ]; then cat "$OUT/check/reproducibility.md"; fi
  echo
  echo '```'
  grep -E "skipped|failed|rows reproduced|limit" "$OUT/check.log" || true
  echo '```'
  echo
  echo "## streamrank bench kernels-latency ${bench_args[*]} (exit $bench_rc)"
  echo
  tr '\r' '\n' <"$OUT/kernels.log" | grep -E '^\|' || { echo '```'; tail -n 20 "$OUT/kernels.log"; echo '```'; }
} >"$OUT/report.md"

echo "report: $OUT/report.md (check exit $check_rc, kernels-latency exit $bench_rc)"
[ "$check_rc" = 0 ] && [ "$bench_rc" = 0 ]
