#!/usr/bin/env python3
"""Times the first touch of fresh anonymous memory, in 4 KiB pages and with transparent huge
pages asked for (MADV_HUGEPAGE, what mimalloc does unless MIMALLOC_ALLOW_THP=0).

On hosts whose freed memory goes back to the hypervisor, each fresh 2 MiB page also faults on
the host, and huge pages can be many times slower to touch than small ones (see BENCHMARKS.md,
eighteenth session). Usage: python3 scripts/first_touch.py [GiB] [rounds]
"""
import mmap
import sys
import time


def touch(size: int, huge: bool) -> float:
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if huge:
        m.madvise(mmap.MADV_HUGEPAGE)
    start = time.perf_counter()
    for offset in range(0, size, 4096):
        m[offset] = 1
    elapsed = time.perf_counter() - start
    m.close()
    return elapsed


def main() -> None:
    gib = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    size = int(gib * (1 << 30)) // (2 << 20) * (2 << 20)
    for r in range(rounds):
        for huge in (False, True):
            t = touch(size, huge)
            kind = "MADV_HUGEPAGE" if huge else "4 KiB pages  "
            print(f"round {r + 1}, {kind}: first touch of {size / (1 << 30):.1f} GiB in {t:.2f} s")


if __name__ == "__main__":
    main()
