"""The benchmark fixes glibc's mmap threshold: anomalib's coreset temporaries are mapped and returned, not piled up."""

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, sys
from anomalib_apc.benchmark.allocator import map_large_temporaries

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
applied = map_large_temporaries() if sys.argv[1] == "set" else False
size = 4 * 1024 * 1024
libc.free(libc.malloc(size))  # glibc's adaptive threshold rises past a freed mapped block of this size...
second = libc.malloc(size)     # ...so by default the next one comes from the heap, where it can pile up
holding = libc.mallinfo2().hblks
libc.free(second)
print(applied, holding - libc.mallinfo2().hblks)  # 1: the block was a mapping of its own
"""


def _probe(mode: str, **environment: str) -> list[str]:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_MMAP_THRESHOLD_"} | environment
    result = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.split()


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_large_temporaries_stay_mapped_once_the_threshold_is_fixed() -> None:
    assert _probe("default") == ["False", "0"]  # the adaptive threshold: the second block is in the heap
    assert _probe("set") == ["True", "1"]  # fixed: every large block is mapped, and unmapped when freed


@pytest.mark.integration
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux's")
def test_a_threshold_the_user_set_is_left_alone() -> None:
    assert _probe("set", MALLOC_MMAP_THRESHOLD_="33554432") == ["False", "0"]
