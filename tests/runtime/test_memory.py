"""memory.trim: the heap's freed blocks leave the process (glibc's malloc only)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
from conftest import ROOT

GLIBC = sys.platform == "linux" and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# 100 blocks of 2 MiB allocated after a 16 MiB one was freed (which raises glibc's threshold to
# 16 MiB, so they come from the heap), each followed by a small block that stays (the heap cannot
# shrink past it), then freed: the MiB given back, without and with trim().
FREED = """
import sys
import numpy as np
from egp_onnx.runtime.memory import trim

def resident():
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) // 1024

big = np.ones(16 << 20, np.uint8)
del big
blocks, kept = [], []
for _ in range(100):
    blocks.append(np.ones(2 << 20, np.uint8))
    kept.append(np.ones(64 << 10, np.uint8))
before = resident()
del blocks
freed = before - resident()
print(freed, trim(), before - resident())
"""


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc and /proc only")
def test_trim_gives_back_the_freed_blocks_the_heap_kept():
    done = subprocess.run([sys.executable, "-c", FREED], capture_output=True, text=True, check=True, cwd=ROOT)
    kept, trimmed, given_back = done.stdout.split()
    assert int(kept) < 50, "glibc's raised threshold kept them in the heap (the reason for trim)"
    assert trimmed == "True" and int(given_back) >= 190
