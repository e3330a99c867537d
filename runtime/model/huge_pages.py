"""Back the memory an onnxruntime session maps (its weights) with 2 MiB transparent huge pages, on Linux.

Why by hand: a decode step streams every weight once per token. With 4 KiB pages the CPU's hardware
prefetcher stops at every page boundary and every page costs a TLB miss; 2 MiB pages remove both.
onnxruntime has no option for it, and glibc's `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` only works when set
before the process starts, which a library cannot do. So, after the session is built, the anonymous memory
that appeared while it was built is collapsed into huge pages with madvise(MADV_COLLAPSE) (Linux 6.1+),
synchronously; only pieces already wholly resident (mincore), so the resident set does not grow.
Decode steps run faster with the weights on huge pages; the collapse itself adds load time in proportion
to the memory collapsed, which only long generations win back (measurements: docs/design.md, "6. The
session: providers, threads, huge pages").

Best effort by design: on other systems, on older kernels, with THP set to "never", or for ranges the kernel
refuses, nothing happens and nothing fails (`log` at debug level says how much was collapsed).
References: https://docs.kernel.org/admin-guide/mm/transhuge.html (MADV_COLLAPSE), madvise(2).
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import sys
import time
from contextlib import contextmanager
from pathlib import Path

__all__ = ["anonymous_ranges", "huge_pages_for_new_memory", "new_ranges", "resident_runs"]

log = logging.getLogger(__name__)

MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25  # <asm-generic/mman-common.h>, the same on x86-64 and arm64
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def anonymous_ranges(maps: str) -> list[tuple[int, int]]:
    """The private, writable, file-less mappings of a /proc/PID/maps text, as sorted (start, end) pairs.

    >>> anonymous_ranges("7f00-8f00 rw-p 00000000 00:00 0\\n9000-a000 r--p 00000000 08:01 42 /lib/x.so\\n")
    [(32512, 36608)]
    """
    ranges = []
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) < 5 or not fields[1].startswith("rw") or fields[1][3] != "p" or fields[4] != "0":
            continue
        if len(fields) > 5 and fields[5] != "[heap]":  # [stack], [vvar] and named mappings stay as they are
            continue
        start, end = (int(bound, 16) for bound in fields[0].split("-"))
        ranges.append((start, end))
    return sorted(ranges)


def new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of the `after` ranges that no `before` range covers (a grown heap gives its new tail).

    >>> new_ranges([(0, 10), (20, 30)], [(0, 15), (20, 30), (40, 50)])
    [(10, 15), (40, 50)]
    """
    result = []
    for start, end in after:
        for old_start, old_end in before:
            if old_end <= start or old_start >= end:
                continue
            if old_start > start:
                result.append((start, old_start))
            start = max(start, old_end)
            if start >= end:
                break
        if start < end:
            result.append((start, end))
    return result


def _load_libc():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)  # the C library already in the process
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


_LIBC = _load_libc()


def _huge_page_size() -> int | None:
    """The transparent huge page size, or None where THP is unavailable or switched off."""
    if _LIBC is None:
        return None
    try:
        if "[never]" in THP_SETTING.read_text():
            return None
        return int((THP_SETTING.parent / "hpage_pmd_size").read_text())  # 2 MiB with 4 KiB pages
    except (OSError, ValueError):  # no THP support in this kernel
        return None


def resident_runs(start: int, end: int, huge: int) -> list[tuple[int, int]]:
    """The runs of `huge`-aligned pieces of [start, end) whose small pages are all resident.

    Collapsing such a piece only regroups memory already in use; a piece with holes would be filled,
    growing the resident set (the arena's reserved but untouched tail, for one).
    """
    start, end = -(-start // huge) * huge, end // huge * huge
    if end - start < huge:
        return []
    page = mmap.PAGESIZE
    residency = ctypes.create_string_buffer((end - start) // page)
    if _LIBC.mincore(start, end - start, residency) != 0:
        return []
    resident, per_piece, runs = residency.raw, huge // page, []  # one byte per small page, bit 0: resident
    for offset in range(0, len(resident), per_piece):
        if b"\x00" in resident[offset : offset + per_piece]:
            continue
        piece = start + offset * page
        if runs and runs[-1][1] == piece:
            runs[-1] = (runs[-1][0], piece + huge)
        else:
            runs.append((piece, piece + huge))
    return runs


def _collapse(start: int, end: int) -> int:
    """Collapse [start, end) (huge-page aligned) into huge pages; the bytes collapsed (0 if the kernel refuses)."""
    _LIBC.madvise(start, end - start, MADV_HUGEPAGE)  # stay huge if the kernel splits and re-faults it later
    return end - start if _LIBC.madvise(start, end - start, MADV_COLLAPSE) == 0 else 0


@contextmanager
def huge_pages_for_new_memory(enabled: bool = True):
    """Collapse into huge pages the anonymous memory mapped while the block runs (best effort).

    >>> with huge_pages_for_new_memory():
    ...     weights = bytearray(8 << 20)
    """
    huge = _huge_page_size() if enabled else None
    if huge is None:
        yield
        return
    before = anonymous_ranges(Path("/proc/self/maps").read_text())
    yield
    started = time.perf_counter()
    fresh = new_ranges(before, anonymous_ranges(Path("/proc/self/maps").read_text()))
    collapsed = sum(_collapse(*run) for start, end in fresh for run in resident_runs(start, end, huge))
    log.debug(
        "huge pages: %.1f of %.1f MiB new memory collapsed in %.2f s",
        collapsed / 2**20,
        sum(end - start for start, end in fresh) / 2**20,
        time.perf_counter() - started,
    )
