"""Huge pages for the session's memory: the /proc/self/maps arithmetic, and the collapse on this kernel."""

import ctypes
import mmap
import platform
import re
import sys
from pathlib import Path

import pytest

from edgegpt.errors import ConfigError
from edgegpt.runtime.model import huge_pages
from edgegpt.runtime.model.huge_pages import anonymous_ranges, huge_pages_for_new_memory, new_ranges
from edgegpt.runtime.model.providers import SessionConfig

MAPS = """\
55d0c0000000-55d0c0400000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000800000 rw-p 00000000 00:00 0
7f0000800000-7f0000900000 r--p 00000000 08:01 1234                       /usr/lib/libc.so.6
7f0000900000-7f0000a00000 rw-p 00001000 08:01 1234                       /usr/lib/libc.so.6
7f0000a00000-7f0000b00000 rw-s 00000000 00:05 99                         /dev/shm/x
7f0000b00000-7f0000c00000 r--p 00000000 00:00 0
7ffc00000000-7ffc00100000 rw-p 00000000 00:00 0                          [stack]
"""


def test_anonymous_ranges_keeps_private_writable_fileless_mappings_and_the_heap():
    assert anonymous_ranges(MAPS) == [(0x55D0C0000000, 0x55D0C0400000), (0x7F0000000000, 0x7F0000800000)]


@pytest.mark.parametrize(
    "before, after, fresh",
    [
        ([], [(0, 10)], [(0, 10)]),
        ([(0, 10)], [(0, 10)], []),
        ([(0, 10)], [(0, 25)], [(10, 25)]),  # the heap grew
        ([(5, 10)], [(0, 20)], [(0, 5), (10, 20)]),  # two mappings merged around an old one
        ([(0, 10), (30, 40)], [(0, 15), (20, 40), (50, 60)], [(10, 15), (20, 30), (50, 60)]),
        ([(0, 100)], [(20, 30)], []),  # shrunk: nothing new
    ],
)
def test_new_ranges_subtracts_what_was_mapped_before(before, after, fresh):
    assert new_ranges(before, after) == fresh


def test_session_config_refuses_a_non_bool_huge_pages():
    with pytest.raises(ConfigError, match="huge_pages must be true or false, got 'yes'"):
        SessionConfig(huge_pages="yes")


def _smaps_kib(address: int, size: int, field: str = "AnonHugePages:") -> int:
    """A /proc/self/smaps field summed over the mappings that overlap [address, address + size)."""
    inside, total = False, 0
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(bound, 16) for bound in head.split("-"))
            inside = start < address + size and address < end
        elif inside and head == field:
            total += int(line.split()[1])
    return total


def _collapse_testable() -> bool:
    """Linux >= 6.1 (MADV_COLLAPSE) with THP in "madvise" mode: only then are the huge pages our doing."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        setting = huge_pages.THP_SETTING.read_text()
    except OSError:
        return False
    major, minor = (int(part) for part in re.match(r"(\d+)\.(\d+)", platform.release()).groups())
    return "[madvise]" in setting and (major, minor) >= (6, 1)


@pytest.mark.skipif(not _collapse_testable(), reason="needs Linux >= 6.1 with transparent huge pages in 'madvise' mode")
@pytest.mark.parametrize("enabled", [True, False])
def test_memory_mapped_inside_the_block_ends_up_in_huge_pages(enabled):
    size = 32 << 20
    with huge_pages_for_new_memory(enabled):
        # malloc'ed and written (resident in 4 KiB pages); not numpy, which asks for huge pages itself
        weights = bytearray(b"\x01") * size
    huge = _smaps_kib(ctypes.addressof(ctypes.c_char.from_buffer(weights)), size)
    if enabled:
        assert huge >= 16 << 10  # at least half of the array in 2 MiB pages
    else:
        assert huge == 0
    assert weights.count(1) == size  # the contents survive the collapse


@pytest.mark.skipif(not _collapse_testable(), reason="needs Linux >= 6.1 with transparent huge pages in 'madvise' mode")
def test_sparse_memory_is_left_alone_so_the_resident_set_does_not_grow():
    size = 32 << 20
    with huge_pages_for_new_memory():
        arena = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # reserved, like an arena
        arena[: size // 2] = b"\x01" * (size // 2)  # the first half written in full
        for offset in range(size // 2, size, 1 << 20):
            arena[offset] = 1  # the second half: one small page in each MiB
    address = ctypes.addressof(ctypes.c_char.from_buffer(arena))
    assert _smaps_kib(address, size, "Rss:") <= (size // 2 >> 10) + 2048  # the sparse half stays sparse
    assert _smaps_kib(address, size) >= 12 << 10  # the written half was collapsed
