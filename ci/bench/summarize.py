#!/usr/bin/env python3
"""Medians (with min..max spread) per system and workload from runs.jsonl,
and each system's ratio to kernel loop, as a Markdown table; where the runs
have a `ublk-cow-ra-off` system, the ratio to it too, and so for
`loop-sparse` (kernel loop over a sparse file beside the overlays) and
`null-classic` (ci/bench/batch-null's classic transport); where
they carry prefetch counters, a second table of how much of what was
prefetched was read."""
import json
import statistics
import sys
from collections import defaultdict

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
by = defaultdict(list)
systems, workloads = [], []
for r in runs:
    by[(r["workload"], r["system"])].append(r)
    if r["system"] not in systems:
        systems.append(r["system"])
    if r["workload"] not in workloads:
        workloads.append(r["workload"])

def metric(wl):
    return "mib_s" if wl.startswith("seq") or wl.startswith("copy") else "iops"


def reference(wl):
    """Ratios are to kernel loop, or to cp for copies."""
    return "cp" if wl.startswith("copy") else "loop"

OFF = "ublk-cow-ra-off"
has_off = OFF in systems
SPARSE = "loop-sparse"
has_sparse = SPARSE in systems
CLASSIC = "null-classic"
has_classic = CLASSIC in systems
print("| workload | system | median | spread (min..max) | rounds | ratio to loop (cp for copies) |"
      + (" ratio to ra-off |" if has_off else "")
      + (" ratio to loop-sparse |" if has_sparse else "")
      + (" ratio to null-classic |" if has_classic else ""))
print("| --- | --- | ---: | --- | ---: | ---: |" + (" ---: |" if has_off else "")
      + (" ---: |" if has_sparse else "") + (" ---: |" if has_classic else ""))
for wl in workloads:
    m = metric(wl)
    unit = "MiB/s" if m == "mib_s" else "IOPS"
    ref = by.get((wl, reference(wl)))
    ref_med = statistics.median(r[m] for r in ref) if ref else None
    for s in systems:
        vals = [r[m] for r in by.get((wl, s), [])]
        if not vals:
            continue
        med = statistics.median(vals)
        ratio = f"{med / ref_med:.2f}x" if ref_med else "-"
        if has_off:
            off = [r[m] for r in by.get((wl, OFF), [])]
            ratio += f" | {med / statistics.median(off):.2f}x" if off else " | -"
        if has_sparse:
            sp = [r[m] for r in by.get((wl, SPARSE), [])]
            ratio += f" | {med / statistics.median(sp):.2f}x" if sp else " | -"
        if has_classic:
            cl = [r[m] for r in by.get((wl, CLASSIC), [])]
            ratio += f" | {med / statistics.median(cl):.2f}x" if cl else " | -"
        # Small values keep two decimals, so that a ratio can be checked.
        f = (lambda v: f"{v:,.2f}") if med < 10 else (lambda v: f"{v:,.0f}")
        print(f"| {wl} | {s} | {f(med)} {unit} | {f(min(vals))}..{f(max(vals))} | {len(vals)} | {ratio} |")

pf = [k for k in by if any("prefetch_bytes" in r for r in by[k])]
if pf:
    print()
    print("| workload | system | prefetched MiB | of it read | read by the reader MiB |")
    print("| --- | --- | ---: | ---: | ---: |")
    for wl in workloads:
        for s in systems:
            rs = [r for r in by.get((wl, s), []) if "prefetch_bytes" in r]
            if not rs:
                continue
            asked = statistics.median(r["prefetch_bytes"] for r in rs) / 2**20
            used = statistics.median(r["prefetch_read_bytes"] for r in rs) / 2**20
            total = statistics.median(r["bytes_read"] for r in rs) / 2**20
            share = f"{used / asked:.0%}" if asked else "-"
            print(f"| {wl} | {s} | {asked:,.1f} | {share} | {total:,.1f} |")
