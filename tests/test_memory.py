"""memory.return_freed_blocks: freed blocks leave the process at once (glibc's malloc only)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
from conftest import ROOT

GLIBC = sys.platform == "linux" and hasattr(ctypes.CDLL(None), "gnu_get_libc_version")

# 100 blocks of 2 MiB allocated after a 16 MiB one was freed (which raises glibc's threshold to
# 16 MiB), each followed by a small block that stays (the heap cannot shrink past it), then freed:
# the MiB given back.
FREED = """
import sys
import numpy as np
from egp_onnx.memory import return_freed_blocks

def resident():
    status = open("/proc/self/status").read().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) // 1024

fixed = sys.argv[1] == "fixed" and return_freed_blocks()
big = np.ones(16 << 20, np.uint8)
del big
blocks, kept = [], []
for _ in range(100):
    blocks.append(np.ones(2 << 20, np.uint8))
    kept.append(np.ones(64 << 10, np.uint8))
before = resident()
del blocks
print(fixed, before - resident())
"""


def freed(mode: str) -> tuple[str, int]:
    done = subprocess.run(
        [sys.executable, "-c", FREED, mode], capture_output=True, text=True, check=True, cwd=ROOT
    )
    fixed, mib = done.stdout.split()
    return fixed, int(mib)


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc and /proc only")
def test_freed_blocks_leave_the_process_once_the_threshold_is_fixed():
    fixed, mib = freed("fixed")
    assert fixed == "True" and mib >= 190
    assert freed("default")[1] < 50, "glibc's raised threshold kept them (the reason for the setting)"
