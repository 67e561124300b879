"""dfplan/runtime/heap.py: freed heap pages go back to the system after a generate call."""
import subprocess
import sys

import pytest

from dfplan.runtime.heap import free_heap_bytes, return_freed_memory

# In a child process: glibc's heap policy is process-wide.
_CHILD = r"""
import ctypes, re
from dfplan.runtime.heap import free_heap_bytes, return_freed_memory, reuse_freed_memory
def rss():
    return int(re.search(r"VmRSS:\s+(\d+)", open("/proc/self/status").read()).group(1)) << 10
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
assert reuse_freed_memory()                 # big blocks from the heap, kept when freed
n = 96 << 20
p = libc.malloc(ctypes.c_size_t(n))
ctypes.memset(p, 1, n)                      # touched: resident
libc.free(ctypes.c_void_p(p))
before = rss()
assert free_heap_bytes() >= n
assert not return_freed_memory(min_bytes=1 << 40)   # below the bar: nothing done
kept = rss()
assert return_freed_memory()
after = rss()
print(before, kept, after)
assert kept > before - (8 << 20)
assert after < before - (64 << 20), (before, after)
"""


def test_return_freed_memory_gives_pages_back():
    if free_heap_bytes() is None or not sys.platform.startswith("linux"):
        pytest.skip("needs glibc >= 2.33 (mallinfo2)")
    r = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


def test_return_freed_memory_below_threshold_is_a_no_op():
    assert return_freed_memory(min_bytes=1 << 62) is False
