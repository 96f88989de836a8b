#!/usr/bin/env bash
# What Raft groups cost a cluster that does nothing: starts three nodes on
# 127.0.0.1 with `cluster.shards = N` for each N given, lets them settle,
# then reads every node's resident memory and CPU time over a window.
#
#   benches/scripts/idle_groups.sh GODEL_BIN [WINDOW_SECS] [SHARDS...]
#
# GODEL_BIN is a `godel` binary (target/release/godel). Defaults: a 60 s
# window, shards 1 3 8. Prints one line per node and a sum per N: RSS in
# MiB at the end of the window, CPU in ms per second of wall time (user +
# system, from /proc/PID/stat). Nodes are stopped by PID.
set -euo pipefail
bin=$(realpath "$1")
window=${2:-60}
shift $(( $# >= 2 ? 2 : $# ))
counts=("$@")
[ ${#counts[@]} -eq 0 ] && counts=(1 3 8)
tick=$(getconf CLK_TCK)
base=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$base"
}
trap cleanup EXIT
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
for n in "${counts[@]}"; do
  dir="$base/shards-$n"
  members=""
  for id in 1 2 3; do
    members+=$'\n'"[[cluster.members]]"$'\n'"id = $id"$'\n'"raft_addr = \"127.0.0.1:$((17470 + id))\""$'\n'"api_addr = \"127.0.0.1:$((17370 + id))\""$'\n'
  done
  pids=()
  for id in 1 2 3; do
    mkdir -p "$dir/$id"
    cat >"$dir/$id/node.toml" <<EOF
[node]
id = $id
data_dir = "$dir/$id/data"
api_addr = "127.0.0.1:$((17370 + id))"
raft_addr = "127.0.0.1:$((17470 + id))"
[fabric]
enabled = false
[cluster]
secret = "idle-groups-bench-secret"
shards = $n
$members
EOF
    RUST_LOG=warn "$bin" serve --config "$dir/$id/node.toml" >"$dir/$id/log" 2>&1 &
    pids+=($!)
  done
  sleep 15
  declare -A t0
  for p in "${pids[@]}"; do t0[$p]=$(cpu_ticks "$p"); done
  sleep "$window"
  total_rss=0 total_cpu=0
  for i in 0 1 2; do
    p=${pids[$i]}
    rss=$(rss_kib "$p")
    used=$(( $(cpu_ticks "$p") - ${t0[$p]} ))
    cpu_ms_per_s=$(awk -v u="$used" -v t="$tick" -v w="$window" 'BEGIN {printf "%.1f", u * 1000 / t / w}')
    printf 'shards=%s node=%s rss_mib=%.1f cpu_ms_per_s=%s\n' "$n" $((i + 1)) "$(awk -v r="$rss" 'BEGIN {print r / 1024}')" "$cpu_ms_per_s"
    total_rss=$(( total_rss + rss ))
    total_cpu=$(( total_cpu + used ))
  done
  printf 'shards=%s total rss_mib=%.1f cpu_ms_per_s=%s\n' "$n" "$(awk -v r="$total_rss" 'BEGIN {print r / 1024}')" \
    "$(awk -v u="$total_cpu" -v t="$tick" -v w="$window" 'BEGIN {printf "%.1f", u * 1000 / t / w}')"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 1 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
  pids=()
  unset t0
done
