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

  logwrites.py entries LOG            one line per entry: index flags mark
  logwrites.py replay LOG IMG A B     apply entries [A, B) to the image IMG
  logwrites.py replay LOG IMG A B fua       only the FUA writes of [A, B)
  logwrites.py replay LOG IMG A B durable   what was durable at B: [A, B) up
                                            to its last FLUSH, FUA writes after
  logwrites.py replay LOG IMG A B SEED      the FUA writes and a random
                                            subset (seeded) of the others
  logwrites.py sectors IMG            one short hash per 512-byte sector
"""
import hashlib
import random
import struct
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


def replay(log_path, img_path, first, end, keep="all"):
    pick = random.Random(int(keep)) if keep not in ("all", "fua", "durable") else None
    durable_to = first
    if keep == "durable":
        with open(log_path, "rb") as log:
            for i, _, _, flags, _, _ in entries(log):
                if first <= i < end and flags & FLUSH:
                    durable_to = i + 1
    with open(log_path, "rb") as log, open(img_path, "r+b") as img:
        for i, off, length, flags, data_pos, _ in entries(log):
            if i >= end:
                break
            if i < first or length == 0:
                continue
            if keep in ("fua", "durable") and i >= durable_to and not flags & FUA:
                continue
            if pick is not None and not flags & FUA and pick.random() < 0.5:
                continue
            img.seek(off)
            if flags & DISCARD:
                img.write(b"\0" * length)
            else:
                log.seek(data_pos)
                img.write(log.read(length))


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
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
