"""Torn and corrupt WAL tails: truncate the file at, and flip a byte at,
every offset of the last records of a segment; opening must recover exactly
the records before the damage and never return a damaged one."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from zrepl import Config, FileStorage, WALEntry
from zrepl.storage.wal import SEGMENT_HEADER, list_segments

CFG = Config(fsync="off")


def data_for(i: int) -> bytes:
    return bytes([i % 256]) * (i % 7 + 3)


def write_records(path: Path, batches: list[int], cfg: Config = CFG) -> list[tuple[int, int]]:
    """Write batches of the given sizes; return each record's (end offset in
    its segment file, last WAL id)."""
    ends = []
    with FileStorage(path, config=cfg) as s:
        first = 1
        for n in batches:
            s.write_wal([WALEntry(i, data_for(i)) for i in range(first, first + n)])
            first += n
            seg = s._wal.segments[-1]
            ends.append((seg.size, first - 1))
    return ends


def reopen_and_check(path: Path, expect_max: int) -> None:
    with FileStorage(path, config=CFG) as s:
        assert s.max_wal() == expect_max
        if expect_max:
            got = s.read_wal(1, expect_max + 10)
            assert got == [WALEntry(i, data_for(i)) for i in range(1, expect_max + 1)]
        # The log is writable right after the cut, and the new batch is kept.
        s.write_wal([WALEntry(expect_max + 1, b"after")])
    with FileStorage(path, config=CFG) as s:
        assert s.max_wal() == expect_max + 1
        assert s.read_wal(expect_max + 1, 1)[0].data == b"after"


@pytest.fixture
def one_segment(data_dir):
    ends = write_records(data_dir, [3, 1, 4, 2, 5, 3])
    (seg_path,) = [p for _, p in list_segments(data_dir / "wal")]
    return data_dir, seg_path, seg_path.read_bytes(), ends


def last_valid(ends: list[tuple[int, int]], offset: int) -> int:
    """Highest WAL id whose record lies entirely before ``offset``."""
    return max([last for end, last in ends if end <= offset], default=0)


def test_truncated_at_every_offset_of_the_last_records(one_segment, caplog):
    data_dir, seg_path, pristine, ends = one_segment
    start = ends[-4][0]  # the last three records
    checked = 0
    for offset in range(start, len(pristine)):
        seg_path.write_bytes(pristine[:offset])
        with caplog.at_level(logging.WARNING, logger="zrepl.storage.wal"):
            caplog.clear()
            reopen_and_check(data_dir, last_valid(ends, offset))
        at_boundary = offset in {end for end, _ in ends}
        # Damage is reported, never silent; a clean boundary is no damage.
        assert ("cut" in caplog.text) != at_boundary, offset
        checked += 1
    assert checked == len(pristine) - start > 50


def test_flipped_byte_at_every_offset_of_the_last_records(one_segment):
    data_dir, seg_path, pristine, ends = one_segment
    start = ends[-4][0]
    for offset in range(start, len(pristine)):
        damaged = bytearray(pristine)
        damaged[offset] ^= 0xFF
        seg_path.write_bytes(bytes(damaged))
        # The record holding the flipped byte and everything after it go.
        reopen_and_check(data_dir, last_valid(ends, offset))


def test_zero_filled_tail_is_cut(one_segment):
    data_dir, seg_path, pristine, ends = one_segment
    seg_path.write_bytes(pristine + b"\0" * 4096)
    reopen_and_check(data_dir, ends[-1][1])
    assert seg_path.stat().st_size < len(pristine) + 4096


def test_damaged_segment_header_drops_the_segment(one_segment):
    data_dir, seg_path, pristine, ends = one_segment
    for offset in range(SEGMENT_HEADER.size):
        damaged = bytearray(pristine)
        damaged[offset] ^= 0x55
        seg_path.write_bytes(bytes(damaged))
        with FileStorage(data_dir, config=CFG) as s:
            if offset < 12:  # magic and version; the reserved word is not checked
                assert s.max_wal() == 0
                assert not seg_path.exists()
                seg_path.write_bytes(pristine)  # restore for the next offset
            else:
                assert s.max_wal() == ends[-1][1]


def test_corruption_in_an_older_segment_cuts_every_later_one(data_dir):
    cfg = Config(fsync="off", segment_bytes=100)
    write_records(data_dir, [4] * 20, cfg)
    segments = list_segments(data_dir / "wal")
    assert len(segments) >= 4
    victim_first, victim = segments[1]
    raw = bytearray(victim.read_bytes())
    raw[-3] ^= 0x01  # inside the last record of the second segment
    victim.write_bytes(bytes(raw))
    with FileStorage(data_dir, config=cfg) as s:
        assert s.max_wal() < segments[2][0]
        assert s.max_wal() >= victim_first - 1
        assert s.read_wal(1, 1000) == [WALEntry(i, data_for(i)) for i in range(1, s.max_wal() + 1)]
    assert [p for _, p in list_segments(data_dir / "wal")][-1].name <= victim.name


def test_a_gap_between_segments_ends_the_log(data_dir):
    cfg = Config(fsync="off", segment_bytes=100)
    write_records(data_dir, [4] * 20, cfg)
    segments = list_segments(data_dir / "wal")
    segments[2][1].unlink()  # someone removed a middle segment
    with FileStorage(data_dir, config=cfg) as s:
        assert s.max_wal() == segments[2][0] - 1
    assert len(list_segments(data_dir / "wal")) == 2


def test_empty_segment_left_by_a_crash_during_rotation(data_dir):
    cfg = Config(fsync="off", segment_bytes=100)
    write_records(data_dir, [4] * 10, cfg)
    top = list_segments(data_dir / "wal")[-1]
    with FileStorage(data_dir, config=cfg) as s:
        top_id = s.max_wal()
    stray = data_dir / "wal" / f"{top_id + 1:020d}.wal"
    stray.write_bytes(b"")  # created, killed before its first write
    with FileStorage(data_dir, config=cfg) as s:
        assert s.max_wal() == top_id
        s.write_wal([WALEntry(top_id + 1, b"x")])  # the name is free again
    assert top[1].exists()
