#!/usr/bin/env python3
"""From runs.jsonl: results.json (every run and the medians) and chart.png
(each system's median relative to kernel loop, one group per workload)."""
import json
import statistics
import sys
from collections import defaultdict

runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
out = sys.argv[2]
metric = lambda wl: "mib_s" if wl.startswith(("seq", "copy")) else "iops"
by = defaultdict(list)
for r in runs:
    by[(r["workload"], r["system"])].append(r[metric(r["workload"])])
workloads = list(dict.fromkeys(r["workload"] for r in runs))
systems = list(dict.fromkeys(r["system"] for r in runs))
medians = {f"{w}/{s}": statistics.median(v) for (w, s), v in by.items()}
json.dump({"runs": runs, "medians": medians}, open(f"{out}/results.json", "w"), indent=1)

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt

fig, ax = plt.subplots(figsize=(12, 5))
width = 0.8 / max(1, len(systems))
for i, s in enumerate(systems):
    ys = []
    for w in workloads:
        ref = by.get((w, "loop"))
        v = by.get((w, s))
        ys.append(statistics.median(v) / statistics.median(ref) if v and ref else 0)
    ax.bar([x + i * width for x in range(len(workloads))], ys, width, label=s)
ax.axhline(1.0, color="black", linewidth=0.8)
ax.set_xticks([x + width * (len(systems) - 1) / 2 for x in range(len(workloads))])
ax.set_xticklabels(workloads, rotation=15)
ax.set_ylabel("median / kernel loop (same boot)")
ax.set_title("ublk-cow and peers, fio io_uring O_DIRECT, guest under QEMU TCG")
ax.legend(fontsize=8, ncol=3)
fig.tight_layout()
fig.savefig(f"{out}/chart.png", dpi=90)
