#!/usr/bin/env python3
"""Where the CPU samples of a `perf record` went, by process and by crate.

    perf script -i perf.data -F pid,tid,ip,sym,dso | benches/tools/perf_by_crate.py \
        --names 101=leader,102=follower,103=follower,100=generator [--top 25]

Reads `perf script` lines ("pid/tid ip symbol (dso)"), prints each process's
share of the samples, then for the nodes (every name but "generator") the
share per crate (the first known crate path in the demangled symbol; kernel
and libc by their DSO) and the top symbols. Flat self time: no call graphs
(release builds have no frame pointers).
"""
import argparse
import collections
import re
import sys

CRATES = [
    "godel", "openraft", "sled", "tokio", "hyper", "h2", "axum", "tower", "reqwest",
    "serde_json", "serde", "bincode", "ractor_cluster", "ractor", "prost", "rustls",
    "tracing_subscriber", "tracing", "prometheus", "mimalloc", "hashbrown", "bytes",
    "http", "futures_util", "futures", "crossbeam", "parking_lot", "std", "alloc", "core",
]
LINE = re.compile(r"^\s*(\d+)/\d+\s+[0-9a-f]+\s+(.*?)\s+\((.*)\)\s*$")


def crate(sym, dso):
    if "kernel" in dso:
        return "kernel"
    if "libc.so" in dso or "libm.so" in dso:
        return "libc (memcpy, malloc helpers, syscalls)"
    if "vdso" in dso:
        return "vdso (clock reads)"
    if sym.startswith("mi_") or sym.startswith("_mi_"):
        return "mimalloc"
    best = None
    for c in CRATES:
        m = re.search(r"(?<![A-Za-z0-9_])" + c + r"::", sym)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), c)
    if best is None:
        return "other: " + (sym.split("::")[0][:40] or "?")
    return best[1] if best[1] not in ("core", "alloc", "std") else "std/core/alloc (generic code)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", required=True)
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    names = dict(kv.split("=") for kv in a.names.split(","))
    per_proc = collections.Counter()
    per_crate = collections.Counter()
    per_sym = collections.Counter()
    total = nodes = 0
    for line in sys.stdin:
        m = LINE.match(line)
        if not m:
            continue
        pid, sym, dso = m.groups()
        total += 1
        name = names.get(pid, "pid " + pid)
        per_proc[name] += 1
        if name == "generator":
            continue
        nodes += 1
        per_crate[crate(sym, dso)] += 1
        per_sym[sym[:110]] += 1
    print(f"{total} samples")
    print("\n| process | share of samples |\n| --- | --- |")
    for k, v in per_proc.most_common():
        print(f"| {k} | {100 * v / total:.1f}% |")
    print(f"\n| crate (three nodes, {nodes} samples) | share |\n| --- | --- |")
    for k, v in per_crate.most_common():
        if 100 * v / nodes >= 0.5:
            print(f"| {k} | {100 * v / nodes:.1f}% |")
    print(f"\n| symbol (three nodes) | share |\n| --- | --- |")
    for k, v in per_sym.most_common(a.top):
        print(f"| `{k}` | {100 * v / nodes:.1f}% |")


main()
