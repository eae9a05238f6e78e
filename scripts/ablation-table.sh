#!/usr/bin/env bash
# Prints the ablation table of docs/benchmarks.md ("Ablation on the toy world") from the
# quality files `slider-run recipes/ablation.yaml` publishes in recipes/out/ablation/.
# Columns: the three-angle slider on the three views (pooled Spearman of eye size vs weight,
# outside/inside change), then the side-view slider alone on side views.
set -euo pipefail
dir="${1:-$(dirname "$0")/../recipes/out/ablation}"
command -v jq >/dev/null || { echo "ablation-table: needs jq (apt-get install jq)" >&2; exit 1; }
[ -f "$dir/q_default.json" ] || { echo "ablation-table: no $dir/q_default.json: run slider-run recipes/ablation.yaml first" >&2; exit 1; }
echo "| variant | Spearman (3 views) | outside/inside (3 views) | Spearman (side) | outside/inside (side) |"
echo "|---|---|---|---|---|"
for f in "$dir"/q_*.json; do
  case "$f" in *_side.json) continue ;; esac
  v=$(basename "$f" .json); v=${v#q_}
  side="$dir/q_${v}_side.json"
  three=$(jq -r '.pooled | "\(.spearman*1000|round/1000) | \(.outside_inside_ratio*100|round/100)"' "$f")
  if [ -f "$side" ]; then
    s=$(jq -r '.pooled | "\(.spearman*1000|round/1000) | \(.outside_inside_ratio*100|round/100)"' "$side")
  else
    s="- | -"
  fi
  echo "| $v | $three | $s |"
done
