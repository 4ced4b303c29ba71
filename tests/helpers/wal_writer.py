"""Child process of the crash test: writes batches to a FileStorage with
fsync="always" forever and reports on stdout, line by line:

    begin FIRST LAST   before write_wal of ids FIRST..LAST
    ack LAST           after write_wal returned (the batch is acknowledged)

Now and then it truncates old segments too, so kills also land there.
Entry data is a pure function of the WAL id (``expected_data``) so the
parent can check every byte after reopening.
"""

from __future__ import annotations

import hashlib
import random
import sys

from zrepl import Config, FileStorage, WALEntry


def expected_data(wal_id: int) -> bytes:
    digest = hashlib.blake2b(wal_id.to_bytes(8, "little")).digest()
    return digest[: 1 + digest[0] % 64]


def main(path: str, seed: int) -> None:
    rng = random.Random(seed)
    storage = FileStorage(path, config=Config(fsync="always", segment_bytes=2048))
    out = sys.stdout
    while True:
        first = storage.max_wal() + 1
        n = rng.randint(1, 24)
        out.write(f"begin {first} {first + n - 1}\n")
        out.flush()
        storage.write_wal([WALEntry(i, expected_data(i)) for i in range(first, first + n)])
        out.write(f"ack {first + n - 1}\n")
        out.flush()
        if rng.random() < 0.05:
            storage.truncate_wal_before_id(max(1, first - 300))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
