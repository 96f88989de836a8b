#!/usr/bin/env bash
# Godel beside RabbitMQ quorum queues, in one sitting, like for like:
# runs ../shared/peers/run_rabbit.sh (fsync on, its default), with
# NATS=1 also ../shared/peers/run_nats.sh (JetStream 2.10 with
# `sync_interval: always`, sync acks: fsync before every acknowledgement
# too), and then
# Godel's `peers` bench with the same task count, payload size, publish
# window, worker count and prefetch, RUNS times each, and prints the
# medians and the ratios Godel / RabbitMQ.
#
#   benches/scripts/side_by_side.sh            # from the project root
#
# Environment (defaults in brackets): RUNS [3], N [20000], SIZE [256],
# WINDOW [256], WORKERS [8], PREFETCH [16], PHASES [enqueue,e2e],
# NATS [0], GODEL_SETUPS ["single:--batch 1;batch64:--batch 64;http:--worker http"]
# (name:extra peers-bench flags, ';'-separated), OUT [a mktemp file]
# (every raw JSON line is kept there). Needs what run_rabbit.sh needs
# (root for apt on first use). Every process it starts is stopped by PID
# by the scripts it calls.
set -euo pipefail
main() {
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
peers="$root/../shared/peers"
RUNS="${RUNS:-3}"; N="${N:-20000}"; SIZE="${SIZE:-256}"; WINDOW="${WINDOW:-256}"
WORKERS="${WORKERS:-8}"; PREFETCH="${PREFETCH:-16}"; PHASES="${PHASES:-enqueue,e2e}"
SETUPS="${GODEL_SETUPS:-single:--batch 1;batch64:--batch 64;http:--worker http}"
OUT="${OUT:-$(mktemp /tmp/side-by-side.XXXXXX)}"
: > "$OUT"
log() { echo "[side_by_side $(date +%T)] $*" >&2; }
# A peer's enqueue and e2e lines from its raw results file ($3), as
# SYSTEM ($1) and SETUP ($2), appended to OUT.
peer_lines() {
  python3 - "$@" >> "$OUT" <<'EOF'
import json, sys
system, setup, path = sys.argv[1:4]
for line in open(path):
    v = json.loads(line)
    if v.get("phase") not in ("enqueue", "e2e"):
        continue
    # As summarize.py counts it: the servers' CPU over the tasks done.
    tasks = v.get("published_ok") if v["phase"] == "enqueue" else v.get("acked_unique")
    cpu = v.get("servers_cpu_s")
    print(json.dumps({"system": system, "setup": setup, "phase": v["phase"],
                      "tasks_per_s": v.get("tasks_per_s"),
                      "server_cpu_us_per_task": round(1e6 * cpu / tasks) if cpu and tasks else None}))
EOF
}
log "raw lines -> $OUT; load average $(cut -d' ' -f1-3 /proc/loadavg)"

rabbit="$(mktemp /tmp/side-by-side-rabbit.XXXXXX)"
log "RabbitMQ: $RUNS runs"
RUNS="$RUNS" CONFIGS=default N="$N" SIZE="$SIZE" WINDOW="$WINDOW" WORKERS="$WORKERS" \
  BATCH="$PREFETCH" PHASES="$PHASES" RESULTS="$rabbit" "$peers/run_rabbit.sh" > /dev/null
peer_lines rabbitmq qq-fsync "$rabbit"
rm -f "$rabbit"

if [ "${NATS:-0}" = 1 ]; then
  nats="$(mktemp /tmp/side-by-side-nats.XXXXXX)"
  log "NATS JetStream (fsync always): $RUNS runs"
  RUNS="$RUNS" CONFIGS=deb13-2.10:always ACKS=sync N="$N" SIZE="$SIZE" WINDOW="$WINDOW" \
    WORKERS="$WORKERS" BATCH="$PREFETCH" PHASES="$PHASES" RESULTS="$nats" "$peers/run_nats.sh" > /dev/null
  peer_lines nats js-fsync-always "$nats"
  rm -f "$nats"
fi

cd "$root"
cargo bench --bench peers --no-run >&2 2>/dev/null || cargo bench --bench peers --no-run >&2
IFS=';' read -ra setups <<< "$SETUPS"
for run in $(seq 1 "$RUNS"); do
  for s in "${setups[@]}"; do
    name="${s%%:*}"; flags="${s#*:}"
    log "Godel $name, run $run"
    # shellcheck disable=SC2086
    timeout -k 10 900 cargo bench --bench peers -- --phases "$PHASES" -n "$N" --size "$SIZE" \
      --window "$WINDOW" --workers "$WORKERS" --prefetch "$PREFETCH" $flags 2> /dev/null \
      | grep '^{' | python3 -c '
import json, sys
for line in sys.stdin:
    v = json.loads(line)
    v["system"] = "godel"; v["setup"] = sys.argv[1]
    print(json.dumps(v))' "$name" >> "$OUT"
  done
done

python3 - "$OUT" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(system, setup, phase, key):
    xs = [r[key] for r in rows if r["system"] == system and r["setup"] == setup
          and r["phase"] == phase and r.get(key) is not None]
    return (statistics.median(xs), min(xs), max(xs), len(xs)) if xs else None
print("| system | setup | phase | tasks/s median (min-max, n) | ratio to RabbitMQ | ratio to NATS | server CPU us/task |")
print("| --- | --- | --- | --- | --- | --- | --- |")
order = {"rabbitmq": 0, "nats": 1}
setups = sorted({(r["system"], r["setup"]) for r in rows}, key=lambda s: (order.get(s[0], 2), s[1]))
for phase in ["enqueue", "e2e"]:
    base = med("rabbitmq", "qq-fsync", phase, "tasks_per_s")
    nats = med("nats", "js-fsync-always", phase, "tasks_per_s")
    for system, setup in setups:
        m = med(system, setup, phase, "tasks_per_s")
        if not m:
            continue
        cpu = med(system, setup, phase, "server_cpu_us_per_task")
        ratio = f"{m[0] / base[0]:.2f}x" if base else "-"
        to_nats = f"{m[0] / nats[0]:.2f}x" if nats else "-"
        cpu_s = f"{cpu[0]:.0f}" if cpu else "-"
        print(f"| {system} | {setup} | {phase} | {m[0]:.0f} ({m[1]:.0f}-{m[2]:.0f}, {m[3]}) | {ratio} | {to_nats} | {cpu_s} |")
EOF
log "done; raw lines in $OUT"
}
main "$@"
