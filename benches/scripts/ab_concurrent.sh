#!/usr/bin/env bash
# Runs two builds' load benchmarks at the same time on the same machine, N
# times, and prints each pair's throughput ratio (new / old) and the mean.
# Both builds see the same host noise at the same moment, which sequential
# runs on a shared VM do not.
#
#   benches/scripts/ab_concurrent.sh OLD_TREE OLD_LOAD_BIN NEW_TREE NEW_LOAD_BIN [RUNS] [SECS]
#
# *_TREE is the checkout the binary was built from (each run starts
# there); *_LOAD_BIN is the benchmark binary that `cargo bench --bench load
# --no-run` prints (target/release/deps/load-*), which runs the `godel`
# binary of its own build.
# Results go to ab_concurrent.jsonl in the current directory.
set -euo pipefail
old_tree=$1 old_bin=$2 new_tree=$3 new_bin=$4 runs=${5:-5} secs=${6:-30}
out=ab_concurrent.jsonl
args=(--profile 100 --mode closed --clients 128 --secs "$secs")
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for i in $(seq 1 "$runs"); do
  (cd "$old_tree" && timeout 300 "$old_bin" "${args[@]}" 2>/dev/null | grep '^{' | tail -1 >"$tmp/old.json") &
  old_pid=$!
  (cd "$new_tree" && timeout 300 "$new_bin" "${args[@]}" 2>/dev/null | grep '^{' | tail -1 >"$tmp/new.json") &
  new_pid=$!
  wait "$old_pid" "$new_pid" || true
  if [ -s "$tmp/old.json" ] && [ -s "$tmp/new.json" ]; then
    printf '{"run":%d,"utc":"%s","old":%s,"new":%s}\n' "$i" "$(date -u +%H:%M:%S)" \
      "$(cat "$tmp/old.json")" "$(cat "$tmp/new.json")" >>"$out"
  else
    echo "run $i: a generator printed no result; skipped" >&2
  fi
  sleep 5
done
python3 - "$out" <<'PY'
import json, statistics, sys
ratios = []
for line in open(sys.argv[1]):
    r = json.loads(line)
    old, new = r["old"]["completed_per_s"], r["new"]["completed_per_s"]
    ratios.append(new / old)
    print(f'{r["utc"]}  old {old:8.0f}  new {new:8.0f}  ratio {new / old:.3f}')
if ratios:
    sd = statistics.stdev(ratios) if len(ratios) > 1 else 0.0
    print(f'{len(ratios)} pairs: mean {statistics.mean(ratios):.3f}, '
          f'median {statistics.median(ratios):.3f}, stdev {sd:.3f}')
PY
