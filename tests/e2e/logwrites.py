#!/usr/bin/env python3
"""Reads a dm-log-writes log and replays it, for the power-cut test.

The log device holds a super block (magic, version, entry count, sector
size) in its first sector, then one entry per logged write: a header sector
(sector, sector count, flags, data length; a MARK's name follows the header
in the same sector) and, except for discards and marks, the written data.
Writes are logged in the order they reached stable storage, and a FLUSH
entry says that everything before it was durable. Replaying the entries
before a FLUSH therefore gives exactly what a power cut right after that
flush would have left on the disk.

A write logged after the last FLUSH but not itself FUA may or may not have
reached stable storage: a disk with a volatile cache keeps any subset of
them. The power-cut test replays such subsets too.

`powercut` runs the checks of the power-cut test (powercut.sh) in one
process: the log is read once and replayed in memory, and each power-cut
point is written out as an image of the file system that holds the overlay,
mounted, the overlay added again over the base, and the device read whole
and compared with the reference images REFDIR/exp<K>.img, the base with the
writes of steps 1..K applied (a step ends with a mark "step<K>" logged once
its writes are durable on the device). The points, each after mark K:
  - at every mark, only what was durable there (up to the last FLUSH, FUA
    writes after): exactly exp<K>;
  - at every FLUSH after a write, all entries up to and including it:
    every 512-byte sector as in exp<K> or as in exp<K+1> (the step in
    progress, whose writes touch each sector at most once);
  - SUBSETS points between two FLUSHes: the entries before the first, the
    FUA writes between and a random subset, at least one left out, of the
    other writes between (what a volatile cache may have kept): the same.

  logwrites.py entries LOG            one line per entry: index flags mark
  logwrites.py replay LOG IMG A B     apply entries [A, B) to the image IMG
  logwrites.py replay LOG IMG A B durable   what was durable at B: [A, B) up
                                            to its last FLUSH, FUA writes after
  logwrites.py sectors IMG            one short hash per 512-byte sector
  logwrites.py powercut LOG FSIMG REFDIR BASE UC WORKDIR SUBSETS SEED
      FSIMG is the file system image the log was recorded over (only its
      size is used: the log starts from zeros); UC the ublk-cow binary;
      WORKDIR gets the point image and a mount point. Prints what failed,
      or a last line "FLUSHES SUBSETS MARKS" (the points checked).
"""
import concurrent.futures
import hashlib
import os
import random
import struct
import subprocess
import sys

MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK = 1, 2, 4, 8


def entries(log):
    """Yields (index, sector, nr_sectors, flags, data_pos, mark) per entry."""
    magic, version, count, ssize = struct.unpack("<QQQI", log.read(28))
    if magic != MAGIC or version != 1:
        raise SystemExit("not a dm-log-writes log")
    pos = ssize
    for i in range(count):
        log.seek(pos)
        head = log.read(ssize)
        sector, nr, flags, dlen = struct.unpack("<QQQQ", head[:32])
        mark = head[32:32 + dlen].decode(errors="replace") if flags & MARK else ""
        pos += ssize
        data_pos = pos
        if not flags & DISCARD:
            pos += nr * ssize
        yield i, sector * ssize, nr * ssize, flags, data_pos, mark


def durable(ents, first, end):
    """The indices of the entries [first, end) durable at `end`: all up to
    the last FLUSH among them, FUA writes after it."""
    last = max((i + 1 for i in range(first, end) if ents[i][3] & FLUSH), default=first)
    return [i for i in range(first, end) if i < last or ents[i][3] & FUA]


def replay(log_path, img_path, first, end, keep="all"):
    if keep not in ("all", "durable"):
        raise SystemExit(f"replay keeps all or durable, not {keep}")
    with open(log_path, "rb") as log:
        ents = list(entries(log))
        end = min(end, len(ents))
        picks = range(first, end) if keep == "all" else durable(ents, first, end)
        with open(img_path, "rb") as f:
            img = bytearray(f.read())
        for j in picks:
            apply(img, log, ents[j])
    with open(img_path, "r+b") as f:
        f.write(img)


class PointFailed(Exception):
    pass


def run(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise PointFailed(f"{' '.join(cmd)}: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def plan(ents, subsets, seed):
    """The points as (kind, step, start, picks, label), sorted by start:
    the image is all entries before `start` plus the entries `picks`."""
    points, intervals = [], []
    step, start = -1, 0
    for i, _, length, flags, _, mark in ents:
        if flags & MARK:
            if mark.startswith("step"):
                step = int(mark[4:])
                points.append(("mark", step, start, durable(ents, start, i), f"at mark step{step} (entry {i}), with the durable writes only"))
            continue
        if not flags & FLUSH:
            continue
        if step >= 0:
            span = [j for j in range(start, i) if not ents[j][3] & MARK]
            # A FLUSH with no write since the last one (nor its own data)
            # leaves what the point before left, or the mark between checked.
            if length or span:
                points.append(("flush", step, start, span + [i], f"at FLUSH entry {i}"))
            volatile = [j for j in span if not ents[j][3] & FUA and ents[j][2] > 0]
            if volatile:
                intervals.append((step, start, i, span, volatile))
        start = i + 1
    rng = random.Random(seed)
    rng.shuffle(intervals)
    seen, chosen, tries = set(), 0, 0
    while intervals and chosen < subsets and tries < 50 * subsets:
        step, first, end, span, volatile = intervals[tries % len(intervals)]
        tries += 1
        kept = tuple(j for j in volatile if rng.random() < 0.5)
        if len(kept) == len(volatile) or (first, kept) in seen:
            continue
        seen.add((first, kept))
        picks = [j for j in span if j not in volatile or j in kept]
        label = (f"before FLUSH entry {end}, with {len(volatile) - len(kept)} of the {len(volatile)} "
                 f"writes since entry {first} left out ({sorted(set(volatile) - set(kept))})")
        points.append(("subset", step, first, picks, label))
        chosen += 1
    points.sort(key=lambda p: p[2])
    return points


def apply(img, log, entry):
    _, off, length, flags, data_pos, _ = entry
    if length == 0:
        return
    if flags & DISCARD:
        img[off:off + length] = bytes(length)
    else:
        log.seek(data_pos)
        img[off:off + length] = log.read(length)


def check_point(got, kind, step, refs):
    """None if the device content `got` is right for the point, else why."""
    old = refs[step]
    new = refs.get(step + 1, old)
    if got == old or (kind != "mark" and got == new):
        return None
    if len(got) != len(old):
        return f"the device has {len(got)} bytes, not {len(old)}"
    bad = [s for s in range(0, len(got), 512)
           if got[s:s + 512] != old[s:s + 512] and (kind == "mark" or got[s:s + 512] != new[s:s + 512])]
    if not bad:
        return None
    base, zero = refs[0], bytes(512)
    what = (f" ({sum(got[s:s + 512] == base[s:s + 512] for s in bad)} read as the base, "
            f"{sum(got[s:s + 512] == zero for s in bad)} as zeros)")
    if kind == "mark":
        return f"{len(bad)} sectors differ from the content after step {step}, the first sector {bad[0] // 512}{what}"
    return (f"{len(bad)} sectors are neither as after step {step} nor as after step {step + 1}, "
            f"the first sector {bad[0] // 512}{what}")


def check_image(point, snap, mnt, base, uc):
    """Writes the file system image `point` to `snap`, mounts it at `mnt`,
    adds the overlay in it over `base` and returns the device's content."""
    with open(snap, "wb") as f:
        f.write(point)
    mounted = subprocess.run(["mount", "-o", "loop", snap, mnt], capture_output=True, text=True)
    if mounted.returncode != 0:
        dmesg = subprocess.run(["dmesg"], capture_output=True, text=True).stdout
        sys.stderr.write("".join(dmesg.splitlines(True)[-6:]))
        raise PointFailed(f"the file system does not mount: {mounted.stderr.strip()}")
    try:
        dev = run(uc, "add", "--base", base, "--overlay", os.path.join(mnt, "ov")).strip()
        try:
            with open(dev, "rb") as f:
                return f.read()
        finally:
            run(uc, "del", "-n", dev.removeprefix("/dev/ublkb"))
    finally:
        run("umount", mnt)


# Points checked at once: each is mostly waiting on mount, add and del, and
# the guest has two CPUs.
WORKERS = 2


def powercut(log_path, fs_img, ref_dir, base, uc, work, subsets, seed):
    with open(log_path, "rb") as log:
        ents = list(entries(log))
    refs = {}
    for name in os.listdir(ref_dir):
        if name.startswith("exp") and name.endswith(".img") and name[3:-4].isdigit():
            with open(os.path.join(ref_dir, name), "rb") as f:
                refs[int(name[3:-4])] = f.read()
    points = plan(ents, subsets, seed)
    img = bytearray(os.path.getsize(fs_img))
    # Each worker its own image file and mount point, handed out in turn.
    slots = []
    for w in range(WORKERS):
        mnt = os.path.join(work, f"mnt{w}")
        os.makedirs(mnt, exist_ok=True)
        slots.append((os.path.join(work, f"snap{w}.img"), mnt))
    free = list(range(WORKERS))
    counts = {"flush": 0, "subset": 0, "mark": 0}
    done = 0

    def check(kind, step, label, point, slot):
        snap, mnt = slots[slot]
        if step not in refs:
            raise PointFailed(f"no reference image for step {step}")
        why = check_point(check_image(point, snap, mnt, base, uc), kind, step, refs)
        if why:
            raise PointFailed(why)

    failed = None
    running = {}

    def settle(fut):
        # A finished point: count it, or keep the first failure.
        nonlocal failed
        k, s, lab, slot = running.pop(fut)
        free.append(slot)
        try:
            fut.result()
            counts[k] += 1
        except PointFailed as e:
            failed = failed or f"power cut {lab}, after step {s}: {e}"

    with open(log_path, "rb") as log, concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
        for kind, step, start, picks, label in points:
            while done < start:
                apply(img, log, ents[done])
                done += 1
            point = bytearray(img)
            for j in picks:
                apply(point, log, ents[j])
            if not free:
                finished, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
                for fut in finished:
                    settle(fut)
            if failed:
                break
            slot = free.pop()
            running[pool.submit(check, kind, step, label, point, slot)] = (kind, step, label, slot)
        for fut in list(running):
            settle(fut)
    if failed:
        print(failed)
        return 1
    print(counts["flush"], counts["subset"], counts["mark"])
    return 0


def main():
    cmd = sys.argv[1]
    if cmd == "entries":
        with open(sys.argv[2], "rb") as log:
            for i, _, _, flags, _, mark in entries(log):
                print(i, flags, mark or "-")
    elif cmd == "replay":
        keep = sys.argv[6] if len(sys.argv) > 6 else "all"
        replay(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), keep)
    elif cmd == "sectors":
        out = []
        with open(sys.argv[2], "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 20)
                if not chunk:
                    break
                for at in range(0, len(chunk), 512):
                    out.append(hashlib.sha1(chunk[at:at + 512]).hexdigest()[:12])
        sys.stdout.write("\n".join(out) + "\n")
    elif cmd == "powercut":
        a = sys.argv[2:]
        sys.exit(powercut(a[0], a[1], a[2], a[3], a[4], a[5], int(a[6]), int(a[7])))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
