#!/usr/bin/env bash
# Godel's growth tables, in one sitting: submit to completion by number of
# sessions, submit throughput by payload size, and dispatch, memory and
# restart by queue depth. Each point is one run of `cargo bench --bench
# peers` on a fresh cluster (three nodes unless said); every raw JSON line
# goes to OUT, and a readable line per point to standard output.
#
#   benches/scripts/growth.sh            # from the project root
#
# Environment (defaults in brackets): SESSIONS ["10 100 500 1000"],
# SIZES ["256 4096 65536"], DEPTHS ["1000 100000 1000000"] (three nodes),
# DEPTHS_ONE_NODE ["10000000"] (one node, with SETTLE [60] seconds of
# memory readings after its restart), N [20000], OUT [a mktemp file].
# An empty list skips its table. Every process a bench starts is stopped
# by PID by the bench itself.
set -euo pipefail
main() {
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
SESSIONS="${SESSIONS-10 100 500 1000}"; SIZES="${SIZES-256 4096 65536}"
DEPTHS="${DEPTHS-1000 100000 1000000}"; DEPTHS_ONE_NODE="${DEPTHS_ONE_NODE-10000000}"
SETTLE="${SETTLE:-60}"; N="${N:-20000}"
OUT="${OUT:-$(mktemp /tmp/growth.XXXXXX)}"
: > "$OUT"
log() { echo "[growth $(date +%T)] $*" >&2; }
log "raw lines -> $OUT; load average $(cut -d' ' -f1-3 /proc/loadavg)"
cd "$root"
cargo bench --bench peers --no-run >&2 2>/dev/null || cargo bench --bench peers --no-run >&2

# One point: a name for the table, then the bench's flags.
point() {
  local name="$1"; shift
  log "$name: $*"
  timeout -k 10 1500 cargo bench --bench peers -- "$@" 2> /dev/null \
    | grep '^{' | python3 -c '
import json, sys
for line in sys.stdin:
    v = json.loads(line)
    v["point"] = sys.argv[1]
    print(json.dumps(v))' "$name" | tee -a "$OUT" >&2
}

for s in $SESSIONS; do
  point "sessions $s single" --phases e2e -n "$N" --workers "$s" --prefetch 1 --batch 1
  point "sessions $s batch64" --phases e2e -n "$N" --workers "$s" --prefetch 1 --batch 64
done
for b in $SIZES; do
  point "payload $b" --phases enqueue -n "$N" --size "$b"
done
for d in $DEPTHS; do
  point "depth $d" --phases depth --depth "$d"
done
for d in $DEPTHS_ONE_NODE; do
  point "depth $d one node" --phases depth --depth "$d" --nodes 1 --settle "$SETTLE"
done

python3 - "$OUT" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def f(v, k, fmt="{:.0f}"):
    x = v.get(k)
    return "-" if x is None else (fmt.format(x) if not isinstance(x, list) else str(x))
for v in rows:
    if v["phase"] == "depth":
        print(f'{v["point"]}: preload {f(v, "preload_tasks_per_s")}/s, dispatch p50/p99 '
              f'{f(v, "dispatch_p50_ms", "{:.2f}")}/{f(v, "dispatch_p99_ms", "{:.2f}")} ms, '
              f'RSS {f(v, "rss_mib")} (peak {f(v, "peak_rss_mib")}) MiB, restart '
              f'{f(v, "restart_serving_s", "{:.2f}")} s, after it {f(v, "restarted_rss_mib")} MiB, '
              f'settled {f(v, "settled_rss_mib")} (max {f(v, "settle_max_rss_mib")}) MiB')
    else:
        lat = (f'e2e p50/p99 {f(v, "e2e_p50_ms", "{:.1f}")}/{f(v, "e2e_p99_ms", "{:.1f}")} ms'
               if v["phase"] == "e2e" else
               f'ack p50/p99 {f(v, "ack_p50_ms", "{:.1f}")}/{f(v, "ack_p99_ms", "{:.1f}")} ms')
        print(f'{v["point"]}: {f(v, "tasks_per_s")} tasks/s, CPU {f(v, "server_cpu_us_per_task")} us/task, '
              f'{lat}, {f(v, "commands_per_entry", "{:.1f}")} commands per entry, load before {f(v, "load_average_before", "{:.2f}")}')
EOF
log "done; raw lines in $OUT"
}
main "$@"
