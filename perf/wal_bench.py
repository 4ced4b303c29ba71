"""WAL append and read throughput of FileStorage, next to the raw-write floor
measured in the same run.

For each fsync policy and batch size (1, 16, 256 entries of 64 bytes) it
times ``FileStorage.write_wal`` and, on the same disk, the floors:

* ``raw write``:        one ``os.write`` per batch of the same bytes (pre-joined)
* ``raw write+fsync``:  the same plus ``os.fsync`` per batch
* ``raw write, framed``: one ``os.write`` per batch of the bytes FileStorage
  really writes (record header, msgpack framing): shows how much of the gap
  is the kernel's cost of a write that is no longer a whole number of pages
* ``check+frame, no I/O``: what ``write_wal`` does besides the system call
  (check the ids and types, pack, checksum), with no write at all: a
  ceiling that ``write_wal`` cannot pass however cheap the write

then times ``read_wal`` streaming the whole log back.  Each figure is the
median of ``--repeat`` runs (default 3).

    python3 perf/wal_bench.py [--repeat 3] [--entries 200000] [--dir DIR] [--json FILE]

Targets (issue "Foundation"): fsync="off", batches of 256 >= 1,000,000
entries/s and >= 40 % of the raw-write floor; read_wal >= 1,000,000 entries/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zrepl import Config, FileStorage, WALEntry  # noqa: E402
from zrepl.storage.base import check_batch  # noqa: E402
from zrepl.storage.wal import encode_record  # noqa: E402

ENTRY_BYTES = 64
BATCHES = (1, 16, 256)
POLICIES = ("off", "batch", "always")
# fsync per batch is slow on real disks: bound those runs by time instead.
FSYNC_TIME_BUDGET = 1.5


def make_batches(n_entries: int, batch: int) -> list[list[WALEntry]]:
    payload = os.urandom(ENTRY_BYTES)
    out = []
    for first in range(1, n_entries + 1, batch):
        out.append([WALEntry(i, payload) for i in range(first, min(first + batch, n_entries + 1))])
    return out


def time_storage(base: Path, policy: str, batches: list[list[WALEntry]]) -> tuple[int, float]:
    path = Path(tempfile.mkdtemp(dir=base))
    try:
        s = FileStorage(path, config=Config(fsync=policy))
        done = 0
        budget = FSYNC_TIME_BUDGET if policy == "always" else float("inf")
        t0 = time.perf_counter()
        for b in batches:
            s.write_wal(b)
            done += len(b)
            if time.perf_counter() - t0 > budget:
                break
        elapsed = time.perf_counter() - t0
        s.close()  # flushes under "batch": not part of the append rate
        return done, elapsed
    finally:
        shutil.rmtree(path, ignore_errors=True)


def time_raw(base: Path, batches: list[list[WALEntry]], fsync: bool,
             framed: bool = False) -> tuple[int, float]:
    if framed:  # the exact bytes FileStorage writes: record header + msgpack
        chunks = [b"".join(encode_record(b[0].wal_id, [e.data for e in b], 0)) for b in batches]
    else:
        chunks = [b"".join(e.data for e in b) for b in batches]
    counts = [len(b) for b in batches]
    fd, name = tempfile.mkstemp(dir=base)
    try:
        done = 0
        budget = FSYNC_TIME_BUDGET if fsync else float("inf")
        t0 = time.perf_counter()
        for chunk, n in zip(chunks, counts):
            os.write(fd, chunk)
            if fsync:
                os.fsync(fd)
            done += n
            if time.perf_counter() - t0 > budget:
                break
        return done, time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(name)


def time_cpu(batches: list[list[WALEntry]]) -> tuple[int, float]:
    """write_wal's work minus the system call: check the batch, pack it and
    checksum it.  A ceiling: write_wal cannot beat this even if the write
    were free."""
    done = 0
    t0 = time.perf_counter()
    for b in batches:
        datas = check_batch(b, b[0].wal_id - 1)
        encode_record(b[0].wal_id, datas, time.time_ns())
        done += len(b)
    return done, time.perf_counter() - t0


def time_read(base: Path, n_entries: int, chunk: int) -> tuple[int, float]:
    path = Path(tempfile.mkdtemp(dir=base))
    try:
        with FileStorage(path, config=Config(fsync="off")) as s:
            for b in make_batches(n_entries, 256):
                s.write_wal(b)
        with FileStorage(path, config=Config(fsync="off")) as s:
            t0 = time.perf_counter()
            pos, got = 1, 0
            while True:
                entries = s.read_wal(pos, chunk)
                if not entries:
                    break
                got += len(entries)
                pos = entries[-1].wal_id + 1
            elapsed = time.perf_counter() - t0
        assert got == n_entries, (got, n_entries)
        return got, elapsed
    finally:
        shutil.rmtree(path, ignore_errors=True)


def median_rate(fn, repeat: int) -> float:
    rates = []
    for _ in range(repeat):
        n, t = fn()
        rates.append(n / t)
    return statistics.median(rates)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--entries", type=int, default=200_000,
                    help="entries per append run (default 200000)")
    ap.add_argument("--read-entries", type=int, default=1_000_000)
    ap.add_argument("--dir", default=None, help="where to write (default: system temp dir)")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    args = ap.parse_args()

    base = Path(tempfile.mkdtemp(prefix="zrepl-walbench-", dir=args.dir))
    results: dict = {"entry_bytes": ENTRY_BYTES, "repeat": args.repeat, "append": [], "read": []}
    try:
        print(f"WAL append, {ENTRY_BYTES}-byte entries, median of {args.repeat} runs, "
              f"in {base}")
        print(f"{'batch':>6} {'what':<22} {'entries/s':>12} {'MB/s':>8} {'vs floor':>9}")
        for batch in BATCHES:
            batches = make_batches(args.entries, batch)
            floor = median_rate(lambda: time_raw(base, batches, False), args.repeat)
            floor_sync = median_rate(lambda: time_raw(base, batches, True), args.repeat)
            framed = median_rate(lambda: time_raw(base, batches, False, True), args.repeat)
            cpu = median_rate(lambda: time_cpu(batches), args.repeat)
            rows = [("raw write", floor, None), ("raw write+fsync", floor_sync, None),
                    ("raw write, framed", framed, framed / floor),
                    ("check+frame, no I/O", cpu, cpu / floor)]
            for policy in POLICIES:
                rate = median_rate(lambda: time_storage(base, policy, batches), args.repeat)
                ref = floor_sync if policy == "always" else floor
                rows.append((f"FileStorage {policy}", rate, rate / ref))
            for what, rate, ratio in rows:
                mb = rate * ENTRY_BYTES / 1e6
                ratio_s = f"{ratio:8.0%}" if ratio is not None else ""
                print(f"{batch:>6} {what:<22} {rate:>12,.0f} {mb:>8.1f} {ratio_s:>9}")
                results["append"].append({"batch": batch, "what": what, "entries_per_s": rate,
                                          "ratio_to_floor": ratio})
        print(f"\nread_wal of {args.read_entries:,} entries (written in batches of 256)")
        for chunk in (256, 4096):
            rate = median_rate(lambda: time_read(base, args.read_entries, chunk), args.repeat)
            print(f"{'chunk ' + str(chunk):<29} {rate:>12,.0f} {rate * ENTRY_BYTES / 1e6:>8.1f}")
            results["read"].append({"chunk": chunk, "entries_per_s": rate})
    finally:
        shutil.rmtree(base, ignore_errors=True)

    off256 = next(r for r in results["append"]
                  if r["batch"] == 256 and r["what"] == "FileStorage off")
    read_best = max(r["entries_per_s"] for r in results["read"])
    checks = [
        ("append off/256 >= 1,000,000 entries/s", off256["entries_per_s"] >= 1e6),
        ("append off/256 >= 40% of raw write", off256["ratio_to_floor"] >= 0.4),
        ("read_wal >= 1,000,000 entries/s", read_best >= 1e6),
    ]
    print()
    for text, ok in checks:
        print(f"target {text}: {'met' if ok else 'MISSED'}")
    rss = psutil.Process().memory_info().rss
    print(f"process RSS at end: {rss / 2**20:.0f} MiB")
    results["targets"] = {t: ok for t, ok in checks}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
