#!/usr/bin/env python3
"""Samples the state of tasks for a while and prints how often each was seen
running (R) or waiting uninterruptibly (D, with the kernel function it waits
in), most often first.

    task-states.py SECONDS [PID]

With PID, only that process's threads, in every state (S too): cheap enough
to leave the machine's figures nearly as they are. Without, every task of
the machine that is R or D: a scan of /proc that under software emulation
takes a good share of one CPU itself, so figures taken meanwhile are lower.
Digits in task names are dropped, so io_uring's workers (iou-wrk-NNN) and
kernel workers count as one name each.
"""
import collections
import os
import sys
import time


def tasks(pid):
    pids = [pid] if pid else [p for p in os.listdir("/proc") if p.isdigit()]
    me = str(os.getpid())
    for p in pids:
        if p == me:
            continue
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tids:
            yield f"/proc/{p}/task/{t}"


def state_of(path):
    st = open(f"{path}/stat").read()
    comm = st[st.index("(") + 1 : st.rindex(")")]
    state = st[st.rindex(")") + 2]
    wchan = open(f"{path}/wchan").read().strip() if state == "D" else ""
    return "".join(c for c in comm if not c.isdigit()), state, wchan


def main():
    secs = float(sys.argv[1])
    pid = sys.argv[2] if len(sys.argv) > 2 else None
    seen = collections.Counter()
    scans = 0
    end = time.time() + secs
    while time.time() < end:
        for path in tasks(pid):
            try:
                comm, state, wchan = state_of(path)
            except (OSError, ValueError):
                continue
            if pid or state in "RD":
                seen[(comm, state, wchan)] += 1
        scans += 1
        time.sleep(0.005)
    print(f"  {scans} scans in {secs:g} s")
    for (comm, state, wchan), n in seen.most_common(12):
        print(f"  {n:6d}  {comm:<18} {state} {wchan}")


if __name__ == "__main__":
    main()
