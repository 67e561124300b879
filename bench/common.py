"""Benchmark plumbing shared by every `dfplan bench` subcommand.

Timing follows asv / optimum-benchmark habits: warm-up calls first, then many samples within
a time budget, reported as median (and p10 / p90); every result file carries metadata (git
commit, versions, CPU / GPU, threads) so numbers from different runs can be compared honestly.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from dfplan.fileio import write_json_atomic
from dfplan.provenance import git_state, library_versions


@dataclass(frozen=True)
class Timing:
    median_s: float
    p10_s: float
    p90_s: float
    samples: int
    calls_per_sample: int

    def to_dict(self) -> dict:
        return asdict(self)


def _sync(device: str | torch.device | None):
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], *, warmup: int = 3, min_samples: int = 10,
           max_samples: int = 300, budget_s: float = 1.0, calls_per_sample: int = 1,
           device=None) -> Timing:
    """Time `fn` (seconds per call): warm-up, then samples until the budget or max_samples.

    Each sample times `calls_per_sample` back-to-back calls (use > 1 when one call is too short
    for the clock, e.g. a GPU kernel) and divides. CUDA work is synchronised around samples.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_samples:
        t0 = time.perf_counter()
        for _ in range(calls_per_sample):
            fn()
        _sync(device)
        samples.append((time.perf_counter() - t0) / calls_per_sample)
        if len(samples) >= min_samples and time.perf_counter() - start > budget_s:
            break
    samples.sort()
    q = lambda f: samples[min(len(samples) - 1, int(f * len(samples)))]  # noqa: E731
    return Timing(statistics.median(samples), q(0.1), q(0.9), len(samples), calls_per_sample)


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:  # other work on the machine skews every number; record how busy it was
        info["loadavg_1m_5m_15m"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name") and "model" not in info:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["isa_flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c"))
                                           or f in ("amx_bf16", "amx_int8"))
                break
    except OSError:
        pass
    try:
        l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        info["l3_cache"] = l3
    except OSError:
        pass
    return info


def l3_bytes(default: int = 32 << 20) -> int:
    """Largest last-level cache size this machine reports (for cold-cache rotation)."""
    try:
        s = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip().upper()
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1], 1)
        return int(s.rstrip("KMG")) * mult
    except (OSError, ValueError):
        return default


def gpu_info() -> dict | None:
    if not torch.cuda.is_available():
        return None
    p = torch.cuda.get_device_properties(0)
    return {"name": p.name, "memory_bytes": p.total_memory, "sm_count": p.multi_processor_count,
            "cuda": torch.version.cuda}


def metadata() -> dict:
    return {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git": git_state(), "versions": library_versions("triton"), "cpu": cpu_info(), "gpu": gpu_info(),
            "host": platform.node()}


def memory_bandwidth(device: str = "cpu", nbytes: int = 256 << 20, budget_s: float = 2.0) -> dict:
    """Measured read and copy bandwidth (GB/s) of `device` with large torch tensors.

    read: sum over a float32 buffer far larger than any cache (what a GEMV does to its weights);
    copy: src -> dst copy, counting both the bytes read and written. `read_gbs` is the best
    sample (p10 time): the bandwidth the machine can deliver, so fractions of it are not
    flattered when other work on a shared machine slows some samples; medians are kept too.
    """
    n = nbytes // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.empty_like(a)
    t_read = timeit(lambda src=a: src.sum(), warmup=2, min_samples=10, max_samples=100,
                    budget_s=budget_s, device=device)
    t_copy = timeit(lambda dst=b, src=a: dst.copy_(src), warmup=2, min_samples=10, max_samples=100,
                    budget_s=budget_s, device=device)
    del a, b
    return {"buffer_bytes": nbytes, "read_gbs": nbytes / t_read.p10_s / 1e9,
            "read_gbs_median": nbytes / t_read.median_s / 1e9,
            "copy_gbs": 2 * nbytes / t_copy.p10_s / 1e9,
            "read_timing": t_read.to_dict(), "copy_timing": t_copy.to_dict()}


def copies_to_exceed(nbytes_per_copy: int, cache_bytes: int, factor: float = 2.0,
                     max_copies: int = 256) -> int:
    """How many distinct weight copies a rotation needs so the working set is > factor x cache."""
    return max(2, min(max_copies, math.ceil(factor * cache_bytes / max(1, nbytes_per_copy)) + 1))


def write_results(path: str | Path, results: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, results)
    return path
