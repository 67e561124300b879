"""Result files of `dfplan bench e2e` / `nightly`: one JSON per run, validated on load.

A result holds the schema version, the benchmark and its version (a change in what is timed
bumps it, so old and new numbers are never compared), git commit + dirty flag, library
versions, the machine (CPU model and flags, cores, RAM, GPU, driver), the parameters, the raw
samples and their statistics. A sha256 digest of the canonical body is stored beside it:
a truncated file fails to parse, a hand-edited one fails the digest, and both are refused
with a message instead of feeding a comparison.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from dfplan.errors import DfplanError
from dfplan.fileio import write_text_atomic
from dfplan.provenance import git_state, library_versions

from .common import cpu_info

SCHEMA = "dfplan-bench-result"
SCHEMA_VERSION = 1
# bumped whenever what a benchmark times changes (prompt handling, what a sample covers, ...)
# e2e 2: dfplan variants time the runtime's own step (LeanStep on CPU), and the bound counts
# the recurrent state: results of version 1 are not comparable
BENCH_VERSIONS = {"e2e": 2, "kernels": 1}
REQUIRED = ("schema", "schema_version", "benchmark", "bench_version", "created_utc", "git",
            "versions", "machine", "params", "variants")


# statistics ---------------------------------------------------------------------------------
def quantile(sorted_xs: list[float], f: float) -> float:
    """Linear-interpolated quantile of an already sorted list."""
    if not sorted_xs:
        return float("nan")
    pos = f * (len(sorted_xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_xs) - 1)
    return sorted_xs[lo] + (sorted_xs[hi] - sorted_xs[lo]) * (pos - lo)


def stats(xs: list[float]) -> dict:
    s = sorted(float(x) for x in xs)
    if not s:
        return {"n": 0}
    return {"n": len(s), "median": statistics.median(s), "p10": quantile(s, 0.1),
            "p90": quantile(s, 0.9), "mean": statistics.fmean(s), "min": s[0], "max": s[-1]}


def metric(samples: list[float]) -> dict:
    """A lower-is-better timing: its raw samples (what compare tests) and their statistics."""
    return {**stats(samples), "samples": [float(x) for x in samples]}


# machine --------------------------------------------------------------------------------------
def _meminfo() -> dict:
    out = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            k, v = line.split(":", 1)
            if k in ("MemTotal", "MemAvailable"):
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def available_ram() -> int | None:
    return _meminfo().get("MemAvailable")


def _nvidia_driver() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine() -> dict:
    """What the numbers depend on. `machine_key` picks the part that must match to compare."""
    cpu = cpu_info()
    m = {"host": platform.node(), "os": platform.platform(), "cpu_model": cpu.get("model"),
         "cpu_flags": cpu.get("isa_flags", []), "logical_cpus": os.cpu_count(),
         "l3_cache": cpu.get("l3_cache"), "ram_bytes": _meminfo().get("MemTotal"),
         "torch_threads": torch.get_num_threads(), "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m["gpu"] = {"name": p.name, "memory_bytes": p.total_memory, "count": torch.cuda.device_count(),
                    "cuda": torch.version.cuda, "driver": _nvidia_driver()}
    return m


def machine_key(m: dict) -> dict:
    """Fields two results must share to be compared (RAM rounded: the kernel reserves a bit)."""
    gpu = m.get("gpu") or {}
    ram = m.get("ram_bytes")
    return {"cpu_model": m.get("cpu_model"), "cpu_flags": sorted(m.get("cpu_flags") or []),
            "logical_cpus": m.get("logical_cpus"),
            "ram_gib": None if ram is None else round(ram / 2**30),
            "gpu": gpu.get("name"), "gpu_count": gpu.get("count")}


def lib_versions() -> dict:
    return library_versions("triton", "transformers", "llama_cpp_python", "mamba_ssm", "scipy", "safetensors")


# files ----------------------------------------------------------------------------------------
def new_result(benchmark: str, params: dict) -> dict:
    if benchmark not in BENCH_VERSIONS:
        raise DfplanError(f"unknown benchmark {benchmark!r}; known: {', '.join(BENCH_VERSIONS)}")
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "benchmark": benchmark,
            "bench_version": BENCH_VERSIONS[benchmark],
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "git": git_state(), "versions": lib_versions(), "machine": machine(),
            "params": params, "variants": {}, "load": {"start": _loadavg(), "max_1m": _loadavg()[0]}}


def _loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [0.0, 0.0, 0.0]


def note_load(res: dict) -> None:
    """Track the highest 1-minute load average seen during the run (called between samples)."""
    load = res.setdefault("load", {"start": _loadavg(), "max_1m": 0.0})
    load["max_1m"] = max(load.get("max_1m", 0.0), _loadavg()[0])
    load["end"] = _loadavg()


def busy(res: dict) -> str | None:
    """Why the run's timings are not trustworthy (other work on the machine), or None."""
    cpus = res["machine"].get("logical_cpus") or 1
    top = (res.get("load") or {}).get("max_1m")
    if top is not None and top > cpus:
        return f"1-minute load average reached {top:.1f} on {cpus} logical CPUs"
    return None


def _canonical(body: dict) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=True).encode()


def digest(body: dict) -> str:
    return hashlib.sha256(_canonical({k: v for k, v in body.items() if k != "digest"})).hexdigest()


def save(result: dict, path: str | os.PathLike) -> Path:
    validate(result, where="result to save", check_digest=False)
    body = {k: v for k, v in result.items() if k != "digest"}
    # round-trip through JSON first, so the digest covers exactly what a reader will see
    body = json.loads(json.dumps(body))
    body["digest"] = digest(body)
    path = Path(path)
    write_text_atomic(path, json.dumps(body, indent=1) + "\n")
    return path


def load(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DfplanError(f"cannot read bench result {path}: {e.strerror or e}") from None
    try:
        res = json.loads(text)
    except json.JSONDecodeError as e:
        raise DfplanError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}): the file is "
                          f"truncated or corrupt; re-run the benchmark") from None
    validate(res, where=str(path), check_digest=True)
    return res


def validate(res, where: str, check_digest: bool = True) -> None:
    if not isinstance(res, dict) or res.get("schema") != SCHEMA:
        raise DfplanError(f"{where} is not a dfplan bench result (schema {SCHEMA!r} expected)")
    missing = [k for k in REQUIRED if k not in res]
    if missing:
        raise DfplanError(f"{where} lacks {', '.join(missing)}: truncated or edited by hand")
    if not isinstance(res["schema_version"], int) or res["schema_version"] > SCHEMA_VERSION:
        raise DfplanError(f"{where} has schema version {res['schema_version']}; this dfplan reads "
                          f"up to {SCHEMA_VERSION}: upgrade dfplan")
    if check_digest:
        if "digest" not in res:
            raise DfplanError(f"{where} has no digest: written by hand or truncated")
        if res["digest"] != digest(res):
            raise DfplanError(f"{where} fails its digest check: the file was edited after the run "
                              f"(numbers in it cannot be trusted); re-run the benchmark")
    if not isinstance(res["variants"], dict):
        raise DfplanError(f"{where}: 'variants' must be an object")
    for name, v in res["variants"].items():
        if not isinstance(v, dict) or v.get("status") not in ("ok", "skipped", "failed"):
            raise DfplanError(f"{where}: variant {name!r} has no valid status")
        if v["status"] == "ok" and not isinstance(v.get("cases"), dict):
            raise DfplanError(f"{where}: variant {name!r} is ok but has no cases")
