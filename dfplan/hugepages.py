"""Weight payloads in 2 MB pages: read from a safetensors file into an anonymous mapping
advised MADV_HUGEPAGE (Linux transparent huge pages).

Batch-1 decode streams every weight byte once per token (~270 MB on Mamba-2 1.3B at the
278 MB plan). In 4 KiB pages that is ~66,000 pages per token, more than any TLB holds, so
every page costs a page-table walk; in 2 MB pages it is ~130. Measured on the 1.3B int8
head GEMV (1 thread, AMD EPYC Zen 3): 4.9-5.2 -> 4.0-4.1 ms warm, 5.6-5.8 -> 4.4-4.5 ms
after streaming 300 MB through the caches. The kernel backs only anonymous memory with
huge pages (a file mmap, which safetensors' load_file returns, stays in 4 KiB pages), so
the payloads are read into one 2 MB-aligned anonymous mapping instead. Resident memory is
unchanged: the pages hold the same bytes the mmap would have faulted in, and the caller
picks only tensors that decode reads in full.

Best effort: where the mapping or the advice is unavailable (not Linux, THP "never") the
tensors still load, in ordinary pages. DFPLAN_HUGEPAGES=0 turns it off (A/B timing).
"""
from __future__ import annotations

import ctypes
import json
import mmap
import os
import struct
from typing import TYPE_CHECKING

from .errors import DfplanError

if TYPE_CHECKING:
    import torch

HUGE = 2 << 20          # x86-64 and arm64 (4 KiB base pages) transparent huge page size
ALIGN = 64              # each tensor starts on a cache line (as torch allocates)
# safetensors dtype -> bytes per element (torch is imported only by read_tensors: the
# torch-free runtime, dfplan/lite, reads its weights through read_arena)
ITEMSIZE = {"U8": 1, "I8": 1, "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I16": 2, "I32": 4,
            "I64": 8, "BOOL": 1}


def enabled() -> bool:
    return os.environ.get("DFPLAN_HUGEPAGES", "1") != "0" and hasattr(mmap, "MADV_HUGEPAGE")


def safetensors_index(path) -> tuple[int, dict]:
    """(byte offset of the data section, {name: {"dtype", "shape", "data_offsets"}}) from the
    file's header (u64 little-endian header length, then the JSON header)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise DfplanError(f"{path} is too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > os.path.getsize(path) - 8:
            raise DfplanError(f"{path}: its safetensors header runs past the end of the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DfplanError(f"{path}: the safetensors header is not valid JSON ({e})") from None
    header.pop("__metadata__", None)
    return 8 + n, header


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def read_arena(path, names, huge: bool = True) -> tuple[mmap.mmap, dict[str, tuple[dict, int]]]:
    """Read the tensors `names` of a safetensors file into one anonymous mapping, advised
    MADV_HUGEPAGE (when `huge`) before anything touches it, each tensor 64-byte aligned.
    Returns (mapping, {name: (header entry, byte offset in the mapping)})."""
    data_start, header = safetensors_index(path)
    spans, total = [], 0
    for name in names:
        info = header[name]
        if info["dtype"] not in ITEMSIZE:
            raise DfplanError(f"{path}: {name} has dtype {info['dtype']}, which {__name__} does not read")
        begin, end = info["data_offsets"]
        spans.append((name, info, begin, end - begin, total))
        total += -(-(end - begin) // ALIGN) * ALIGN
    # anonymous, private; HUGE more than needed so the tensors can start on a 2 MB boundary
    buf = mmap.mmap(-1, max(total, 1) + HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = -_address(buf) % HUGE
    if huge and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE, base, max(total, 1))
        except OSError:         # THP not built into this kernel: ordinary pages
            pass
    where = {}
    view = memoryview(buf)
    try:
        with open(path, "rb") as f:
            for name, info, begin, nbytes, off in spans:
                f.seek(data_start + begin)
                if f.readinto(view[base + off:base + off + nbytes]) != nbytes:
                    raise DfplanError(f"{path} ends inside tensor {name}: the file is truncated")
                where[name] = (info, base + off)
    finally:
        view.release()
    return buf, where


def read_tensors(path, names) -> dict[str, "torch.Tensor"]:
    """The tensors `names` of a safetensors file, read into one anonymous mapping advised
    MADV_HUGEPAGE before anything touches it. Each tensor has its own storage (a view of
    the mapping, which lives as long as any of them): saving them again sees no shared
    memory. {} when disabled or there is nothing to read."""
    import torch

    names = list(names)
    if not names or not enabled():
        return {}
    buf, where = read_arena(path, names)
    out = {}
    for name, (info, off) in where.items():
        dtype = getattr(torch, _TORCH_NAMES.get(info["dtype"], ""), None)
        count = (info["data_offsets"][1] - info["data_offsets"][0]) // ITEMSIZE[info["dtype"]]
        t = torch.frombuffer(buf, dtype=dtype, count=count, offset=off) if count else \
            torch.empty(0, dtype=dtype)
        out[name] = t.view(info["shape"])
    return out


_TORCH_NAMES = {"U8": "uint8", "I8": "int8", "F16": "float16", "BF16": "bfloat16", "F32": "float32",
                "F64": "float64", "I16": "int16", "I32": "int32", "I64": "int64", "BOOL": "bool"}
