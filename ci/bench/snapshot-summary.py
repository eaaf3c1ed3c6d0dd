#!/usr/bin/env python3
"""The table of `make bench-snapshot` from runs.jsonl: the pause of each
`snapshot -n` (median, 90th percentile, max, and the median of each part),
and fio with snapshots beside fio alone and fio beside other commands of
ours (median IOPS and worst completion latency over the rounds), as
Markdown."""
import json
import statistics
import sys

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
pauses = [r for r in runs if r["workload"] == "snapshot-pause"]


def pct(vals, p):
    vals = sorted(vals)
    return vals[min(len(vals) - 1, int(round(p / 100 * (len(vals) - 1))))]


print(f"| snapshot -n under fio ({len(pauses)} snapshots) | median ms | p90 ms | max ms |")
print("| --- | ---: | ---: | ---: |")
for key, name in [("pause_ms", "pause"), ("drained_ms", "requests in flight done"),
                  ("frozen_ms", "overlay frozen"), ("opened_ms", "new overlay serving"),
                  ("command_ms", "the whole `snapshot -n` command")]:
    v = [r[key] for r in pauses if key in r]
    if not v:
        continue
    print(f"| {name} | {statistics.median(v):.1f} | {pct(v, 90):.1f} | {max(v):.1f} |")
print()
print("| fio randrw 4k QD16 | rounds | median IOPS | worst completion, median of rounds (ms) | worst of all (ms) |")
print("| --- | ---: | ---: | ---: | ---: |")
for wl in ["fio-alone", "fio-with-snapshots", "fio-with-commands"]:
    rs = [r for r in runs if r["workload"] == wl]
    if rs:
        iops = statistics.median(r["iops"] for r in rs)
        worst = [r["clat_max_ms"] for r in rs]
        print(f"| {wl} | {len(rs)} | {iops:,.0f} | {statistics.median(worst):.1f} | {max(worst):.1f} |")
