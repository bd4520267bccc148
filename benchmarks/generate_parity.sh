#!/usr/bin/env bash
# Greedy text and kept entries of `kvx generate` on the default model, this checkout against another commit
# (e.g. the one before a runtime change): every policy question-aware, question-agnostic with two questions,
# chunked prefill, h2o at a budget that keeps everything. Prints OK / DIFF per case; exit 1 on any DIFF.
#   bash benchmarks/generate_parity.sh <commit> [context-file]
set -euo pipefail
rev=${1:?usage: generate_parity.sh <commit> [context-file]}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'git -C "$here" worktree remove --force "$work/old" >/dev/null 2>&1 || true; rm -rf "$work"' EXIT
git -C "$here" worktree add -q --detach "$work/old" "$rev"
ctx=${2:-$work/ctx.txt}
[ -f "$ctx" ] || head -c 2500 "$here/docs/architecture.md" | tail -c 2000 > "$ctx"
prompt="$(cat "$ctx") Summarize the data flow in one sentence."
cases=()
for pol in "snapkv 20%" "laprox 10%" "ada-snapkv 10%" "pyramidkv 10%" "h2o 20%" "tova 20%" "streaming 20%" \
           "ahakv 20%" "expected-attention 20%" "knorm 20%" "criticalkv 20%" "kvzip 20%"; do
  set -- $pol; cases+=("--policy $1 --budget $2")
done
run() {  # src, then the case's options: one line of JSON per answer (text, kept entries)
  local src=$1; shift
  PYTHONPATH=$src python -m kvx generate --json --quiet --max-tokens 24 "$@" | python -c '
import json, sys
for line in sys.stdin:
    d = json.loads(line)
    for r in d.get("results", [d]):
        print(json.dumps({"text": r["text"], "kept": r["kv_entries_kept"]}))'
}
status=0
check() {  # a label, then the options
  local label=$1; shift
  local a b
  a=$(run "$work/old" "$@"); b=$(run "$here" "$@")
  if [ "$a" == "$b" ]; then echo "OK    $label"; else echo "DIFF  $label"; echo "  old: $a"; echo "  new: $b"; status=1; fi
}
for c in "${cases[@]}"; do check "$c" $c "$prompt"; done
check "full" "$prompt"
check "agnostic snapkv 20%, 2 questions" --policy snapkv --budget 20% --context "$ctx" -q "What is the data flow?" -q "Which file parses options?"
check "agnostic tova 20%, 2 questions" --policy tova --budget 20% --context "$ctx" -q "What is the data flow?" -q "Which file parses options?"
check "agnostic kvzip 20%" --policy kvzip --budget 20% --context "$ctx" -q "What is the data flow?"
check "snapkv 20% --prefill-chunk 128" --policy snapkv --budget 20% --prefill-chunk 128 "$prompt"
check "tova 64 --prefill-chunk 100" --policy tova --budget 64 --prefill-chunk 100 "$prompt"
check "raw h2o 100%" --raw --policy h2o --budget 100% "$prompt"
exit $status
