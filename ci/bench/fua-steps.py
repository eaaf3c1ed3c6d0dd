#!/usr/bin/env python3
"""The steps of a FUA write from a trace that `fua_steps` (ci/bench/fua.sh)
made: lines `fua-trace SYSTEM: <ftrace line>`.

A write runs from fio's submission of a WRITE to fio's completion of it.
Its steps are the events between, named by what happened (the server's
submissions by opcode, an io_uring worker's completions, ext4's sync,
jbd2 woken, its commit) and numbered when they repeat within a write.
Prints, per system, the median time of a write, its most frequent
sequence of steps, and the median time from each step to the next over
the writes that took that sequence.
"""
import collections
import re
import statistics
import sys

LINE = re.compile(r"fua-trace (\S+): \s*(\S+)-\d+\s+\[\d+\]\s+\S+\s+([\d.]+): (\w+): (.*)")


def label(comm, event, rest):
    if comm == "fio":
        if event == "io_uring_submit_req" and "opcode WRITE" in rest:
            return "fio submits"
        if event == "io_uring_complete":
            return "fio completes"
        return None
    if event == "io_uring_submit_req":
        return "submit " + re.search(r"opcode (\w+)", rest).group(1)
    if event == "io_uring_complete" and comm.startswith("iou-wrk"):
        return "worker done"
    if event in ("ext4_sync_file_enter", "ext4_sync_file_exit", "jbd2_start_commit", "jbd2_end_commit"):
        return event
    if event == "sched_wakeup" and "comm=jbd2" in rest:
        return "jbd2 woken"
    return None


def main(path):
    events = collections.defaultdict(list)
    for line in open(path):
        m = LINE.search(line)
        if m:
            name = label(m.group(2), m.group(4), m.group(5))
            if name:
                events[m.group(1)].append((float(m.group(3)) * 1e6, name))
    for system, evs in events.items():
        writes, cur = [], None
        for t, name in evs:
            if name == "fio submits":
                cur = [(t, name)]
            elif cur is not None:
                cur.append((t, name))
                if name == "fio completes":
                    writes.append(cur)
                    cur = None
        seqs = collections.defaultdict(list)
        for w in writes:
            seen = collections.Counter()
            steps = []
            for t, name in w:
                seen[name] += 1
                steps.append((t, name if seen[name] == 1 else f"{name} #{seen[name]}"))
            seqs[tuple(n for _, n in steps)].append(steps)
        if not writes:
            print(f"{system}: no whole write traced")
            continue
        total = statistics.median(w[-1][0] - w[0][0] for w in writes)
        seq, ws = max(seqs.items(), key=lambda kv: len(kv[1]))
        print(f"{system}: {len(writes)} writes traced, median {total:.0f} us a write; "
              f"{len(ws)} took the steps below")
        for i in range(1, len(seq)):
            gap = statistics.median(w[i][0] - w[i - 1][0] for w in ws)
            print(f"  {seq[i - 1]:>24} -> {seq[i]:<24} {gap:6.0f} us")


if __name__ == "__main__":
    main(sys.argv[1])
