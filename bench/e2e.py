"""`dfplan bench e2e`: prefill latency, decode ms/token and tok/s, peak memory and model bytes.

Every variant (variants.py) is loaded once, in its own worker process by default, so its peak
RSS (VmHWM minus the worker's RSS once its libraries are imported) and peak GPU memory
(max allocated) are its own. Samples are interleaved: round after round, each (variant, batch)
case takes one sample, in an order rotated every round, so all variants share whatever the
machine is doing. A sample is one P-token prefill plus G greedy decode steps. Warm-up rounds
first; then rounds continue until every case has >= min_samples AND >= min_time_s of samples
(or max_samples). Memory bandwidth is measured in the same run (start and end, the higher
used), giving the bandwidth bound of a decode step ((model bytes + the recurrent state read
and written per sequence) / bandwidth) and the fraction of it each variant reaches; the
weights-only bound is kept beside it.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from dfplan.errors import DfplanError
from dfplan.loading import load_config
from dfplan.prompting import proc_status_bytes

from . import schema
from .common import memory_bandwidth
from .variants import (
    VARIANTS,
    Prepared,
    Sources,
    Variant,
    make_runner,
    preload,
    prepare,
    prompt_ids,
    resident_bytes,
    resolve_names,
    state_rw_bytes,
    unavailable,
)


@dataclass
class E2EConfig:
    model: str = "preset:tiny"
    random_init: bool = True
    variants: tuple | None = None     # None: the device's default set
    prompt_len: int = 128
    gen_len: int = 64
    batches: tuple = (1,)
    device: str = "cpu"
    threads: int | None = None
    warmup: int = 1
    min_samples: int = 10
    max_samples: int = 200
    min_time_s: float = 5.0           # time floor per case
    seed: int = 0
    packed: str | None = None
    plan: str = "dfssm"
    cache_dir: str | None = None
    isolate: bool = True              # one worker process per variant
    bandwidth_mib: int = 256
    progress: bool = True


WORKER_OVERHEAD = 512 << 20


def _cache_dir(cfg: E2EConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir)
    p = Path(cfg.model).expanduser()
    key = f"{p.resolve()}:{p.stat().st_mtime_ns}" if p.exists() else f"{cfg.model}:{cfg.random_init}"
    tag = hashlib.sha256(f"{key}:seed{cfg.seed}".encode()).hexdigest()[:12]
    return Path("~/.cache/dfplan/bench").expanduser() / f"{Path(cfg.model).name.replace(':', '-')}-{tag}"


def _rss_now() -> int:
    return proc_status_bytes("VmRSS") or 0


def _peak_rss() -> int:
    """Peak RSS of this process's own address space (VmHWM; getrusage off Linux)."""
    peak = proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# workers -------------------------------------------------------------------------------------
class _Inline:
    """Runner in this process (tests, --no-isolate): peak memory is not per variant then."""

    def __init__(self, p: Prepared):
        t = time.perf_counter()
        before = _rss_now()
        self.runner = make_runner(p)
        self.info = {"model_bytes": self.runner.model_bytes, "load_s": time.perf_counter() - t,
                     "load_rss_bytes": _rss_now() - before,
                     "state_rw_bytes": getattr(self.runner, "state_rw_bytes", None),
                     "state_dtype": getattr(self.runner, "state_dtype", None)}

    def sample(self, *args):
        return self.runner.sample(*args)

    def memory(self) -> dict:
        return {"peak_rss_bytes": None, "peak_gpu_bytes": None,
                "memory_note": "not isolated: peak memory is not measured per variant"}

    def close(self):
        getattr(self.runner, "close", lambda: None)()
        self.runner = None


def _worker(conn, p: Prepared):
    try:
        preload(p)
        base = _rss_now()
        t = time.perf_counter()
        runner = make_runner(p)
        conn.send(("ok", {"model_bytes": runner.model_bytes, "load_s": time.perf_counter() - t,
                          "base_rss_bytes": base, "load_rss_bytes": _rss_now() - base,
                          "state_rw_bytes": getattr(runner, "state_rw_bytes", None),
                          "state_dtype": getattr(runner, "state_dtype", None)}))
        while True:
            msg = conn.recv()
            if msg[0] == "sample":
                try:
                    conn.send(("ok", runner.sample(*msg[1:])))
                except DfplanError as e:
                    conn.send(("unsupported", str(e)))
            elif msg[0] == "memory":
                gpu = (torch.cuda.max_memory_allocated() if p.device.startswith("cuda") else None)
                conn.send(("ok", {"peak_rss_bytes": _peak_rss(), "base_rss_bytes": base,
                                  "peak_gpu_bytes": gpu}))
            else:
                getattr(runner, "close", lambda: None)()
                break
    except Exception as e:  # reported to the parent, which marks the variant failed
        conn.send(("error", f"{type(e).__name__}: {e}", traceback.format_exc(limit=4)))


class _Process:
    def __init__(self, p: Prepared, ctx):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker, args=(child, p), daemon=True)
        self.proc.start()
        self.info = self._recv()

    def _recv(self):
        if not self.conn.poll(3600):
            raise RuntimeError("worker did not answer within an hour")
        try:
            msg = self.conn.recv()
        except EOFError:
            raise RuntimeError(f"worker died (exit code {self.proc.exitcode}; out of memory?)") from None
        if msg[0] == "error":
            raise RuntimeError(msg[1])
        if msg[0] == "unsupported":
            raise DfplanError(msg[1])
        return msg[1]

    def sample(self, *args):
        self.conn.send(("sample", *args))
        return self._recv()

    def memory(self) -> dict:
        self.conn.send(("memory",))
        return self._recv()

    def close(self):
        try:
            self.conn.send(("stop",))
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()


class _LiteProcess:
    """The lite runtime in `python -m dfplan.lite.worker`: a process that never imports torch
    (a spawned worker would, through this module), so its peak RSS is the runtime's own."""

    def __init__(self, p: Prepared, mcfg):
        cmd = [sys.executable, "-m", "dfplan.lite.worker", p.path]
        if p.threads:
            cmd += ["--threads", str(p.threads)]
        if p.options.get("state_dtype"):
            cmd += ["--state-dtype", p.options["state_dtype"]]
        self.vocab = mcfg.vocab_size
        self.err = tempfile.TemporaryFile(mode="w+")      # a file, not a pipe: never fills up
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True)
        self.info = self._recv()
        self.info["state_rw_bytes"] = state_rw_bytes(mcfg, self.info["state_dtype"])

    def _recv(self):
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            self.err.seek(0)
            raise RuntimeError(f"lite worker died (exit code {self.proc.returncode}): "
                               f"{self.err.read()[-500:].strip()}")
        msg = json.loads(line)
        if "error" in msg:
            raise DfplanError(msg["error"])
        return msg["ok"]

    def _send(self, obj) -> None:
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def sample(self, batch: int, P: int, G: int, seed: int):
        if batch != 1:
            raise DfplanError("the lite runtime decodes one sequence")
        self._send({"cmd": "sample", "ids": prompt_ids(P, self.vocab, seed), "gen": G})
        return tuple(self._recv())

    def memory(self) -> dict:
        self._send({"cmd": "memory"})
        return self._recv()

    def close(self):
        try:
            self._send({"cmd": "stop"})
        except (OSError, BrokenPipeError, ValueError):
            pass
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()


# the run -------------------------------------------------------------------------------------
def _check_memory(chosen: list[Variant], mcfg, cfg: E2EConfig, packed_bytes: int | None) -> dict:
    """Refuse before starting anything when the variants cannot all be resident at once."""
    need = {v.name: resident_bytes(v, mcfg, packed_bytes) for v in chosen}
    fp32_ref = resident_bytes(Variant("ref", "", "dfplan", "fp32"), mcfg, None)
    # each worker process also holds the Python + torch runtime (~0.3-0.5 GB)
    total = sum(need.values()) + (WORKER_OVERHEAD * len(need) if cfg.isolate else fp32_ref)
    avail = schema.available_ram()
    where = "RAM"
    if cfg.device.startswith("cuda"):
        avail, where = torch.cuda.mem_get_info()[0], "GPU memory"
        total = sum(need.values())
    if avail is not None and total > 0.9 * avail:
        detail = ", ".join(f"{k} {b / 2**30:.2f}" for k, b in need.items())
        raise DfplanError(f"the chosen variants need about {total / 2**30:.1f} GiB of {where} together "
                          f"({detail} GiB) but {avail / 2**30:.1f} GiB is free; pick fewer variants "
                          f"(--variants) or a smaller model")
    if cfg.device == "cpu" and avail is not None and 2 * fp32_ref > 0.9 * avail:
        raise DfplanError(f"building the reference checkpoint needs about {2 * fp32_ref / 2**30:.1f} GiB "
                          f"but {avail / 2**30:.1f} GiB of RAM is free")
    return need


def _packed_estimate(cfg: E2EConfig, mcfg) -> int | None:
    from dfplan.formats.size import plan_bytes
    from dfplan.runtime.api import resolve_plan
    if cfg.packed:
        from dfplan.packed_files import read_manifest
        return int(read_manifest(Path(cfg.packed)).get("payload_bytes") or 0) or None
    return plan_bytes(mcfg, resolve_plan(cfg.plan, mcfg)).total_bytes


def run_e2e(cfg: E2EConfig, log=print) -> dict:
    if cfg.device not in ("cpu", "cuda"):
        raise DfplanError(f"bench e2e: device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DfplanError("bench e2e: --device cuda but no CUDA device is visible")
    if cfg.prompt_len < 1 or cfg.gen_len < 1 or cfg.min_samples < 1 or cfg.warmup < 0:
        raise DfplanError("bench e2e: prompt and generation lengths, samples must be positive")
    chosen = resolve_names(cfg.variants, cfg.device)
    if not cfg.random_init and str(cfg.model).startswith("preset:"):
        raise DfplanError(f"{cfg.model} has no weights; add --random-init")
    mcfg = load_config(cfg.model)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    res = schema.new_result("e2e", {**asdict(cfg), "batches": list(cfg.batches),
                                    "variants": [v.name for v in chosen], "model_name": mcfg.name})
    out = res["variants"]
    runnable = []
    for v in chosen:
        why = unavailable(v, cfg.device, mcfg)
        if why:
            out[v.name] = {"status": "skipped", "reason": why, "description": v.description}
            log(f"skip {v.name}: {why}")
        else:
            runnable.append(v)
    need = _check_memory(runnable, mcfg, cfg, _packed_estimate(cfg, mcfg)) if runnable else {}

    src = Sources(cfg.model, cfg.random_init, cfg.seed, _cache_dir(cfg), mcfg, cfg.packed, cfg.plan, log)
    prepared = {}
    for v in runnable:
        try:
            prepared[v.name] = prepare(v, src, cfg.device, cfg.threads)
        except (DfplanError, RuntimeError, OSError) as e:
            out[v.name] = {"status": "failed", "reason": f"preparing: {e}", "description": v.description}
            log(f"fail {v.name}: {e}")

    bw_start = memory_bandwidth(cfg.device, nbytes=cfg.bandwidth_mib << 20)
    workers = {}
    ctx = mp.get_context("spawn")
    try:
        for name, p in prepared.items():
            try:
                if p.kind == "lite" and cfg.isolate:
                    workers[name] = _LiteProcess(p, mcfg)
                else:
                    workers[name] = _Process(p, ctx) if cfg.isolate else _Inline(p)
            except (RuntimeError, DfplanError, OSError) as e:
                out[name] = {"status": "failed", "reason": f"loading: {e}",
                             "description": _desc(name)}
                log(f"fail {name}: {e}")
        samples = _interleave(workers, cfg, out, log, res)
        mem = {}
        for name, w in workers.items():
            try:
                mem[name] = w.memory()
            except (RuntimeError, DfplanError) as e:
                mem[name] = {"memory_note": str(e)}
    finally:
        for w in workers.values():
            w.close()
    bw_end = memory_bandwidth(cfg.device, nbytes=cfg.bandwidth_mib << 20)
    bw_gbs = max(bw_start["read_gbs"], bw_end["read_gbs"])
    res["bandwidth"] = {"read_gbs": bw_gbs, "read_gbs_at_start": bw_start["read_gbs"],
                        "read_gbs_at_end": bw_end["read_gbs"], "copy_gbs": bw_start["copy_gbs"],
                        "buffer_bytes": bw_start["buffer_bytes"]}
    for name, w in workers.items():
        if name in out:      # failed while sampling
            continue
        m = mem.get(name, {})
        peak = m.get("peak_rss_bytes")
        entry = {"status": "ok", "description": _desc(name), **w.info, **m,
                 "state_rw_bytes": w.info.get("state_rw_bytes") or state_rw_bytes(mcfg, VARIANTS[name].dtype),
                 "estimated_resident_bytes": need.get(name),
                 "peak_rss_over_base_bytes": (peak - m["base_rss_bytes"]) if peak and m.get("base_rss_bytes") else None,
                 "cases": {}}
        for batch, case in samples[name].items():
            entry["cases"][f"b{batch}"] = _case_stats(batch, case, entry["model_bytes"],
                                                      entry["state_rw_bytes"], bw_gbs, cfg.gen_len)
        out[name] = entry
    schema.note_load(res)
    res["loadavg_after"] = list(os.getloadavg())
    return res


def _desc(name: str) -> str:
    return VARIANTS[name].description


def _interleave(workers: dict, cfg: E2EConfig, out: dict, log, res: dict) -> dict:
    """Round-robin samples over every (variant, batch) case; returns {name: {batch: {...}}}."""
    cases = [(n, b) for n in workers for b in cfg.batches]
    data = {n: {b: {"prefill_s": [], "decode_s": [], "skipped": None} for b in cfg.batches} for n in workers}
    done = set()
    rounds = 0
    bar = None
    if cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=len(cases) * cfg.min_samples, desc="e2e samples", unit="sample")
    seed = cfg.seed
    while True:
        live = [c for c in cases if c not in done and c[0] in workers and c[0] not in out]
        if not live:
            break
        schema.note_load(res)
        k = rounds % len(live)
        for name, batch in live[k:] + live[:k]:          # rotate the order every round
            d = data[name][batch]
            seed += 1
            try:
                pre, dec = workers[name].sample(batch, cfg.prompt_len, cfg.gen_len, seed)
            except DfplanError as e:                       # this batch is not supported
                d["skipped"] = str(e)
                done.add((name, batch))
                continue
            except RuntimeError as e:
                out[name] = {"status": "failed", "reason": f"sampling: {e}", "description": _desc(name)}
                log(f"fail {name}: {e}")
                continue
            if rounds < cfg.warmup:
                continue
            d["prefill_s"].append(pre)
            d["decode_s"].append(dec)
            n = len(d["decode_s"])
            if bar is not None and n <= cfg.min_samples:
                bar.update(1)
            spent = sum(d["prefill_s"]) + sum(d["decode_s"])
            if (n >= cfg.min_samples and spent >= cfg.min_time_s) or n >= cfg.max_samples:
                done.add((name, batch))
        rounds += 1
    if bar is not None:
        bar.close()
    return data


def _case_stats(batch: int, d: dict, model_bytes: int, state_rw: int, bw_gbs: float, G: int) -> dict:
    if d["skipped"]:
        return {"batch": batch, "status": "skipped", "reason": d["skipped"]}
    per_tok_ms = [s / G * 1e3 for s in d["decode_s"]]
    metrics = {"prefill_ms": schema.metric([s * 1e3 for s in d["prefill_s"]]),
               "decode_ms_per_token": schema.metric(per_tok_ms)}
    # every step reads every weight once and each sequence's state once, writing it back
    weights_ms = model_bytes / (bw_gbs * 1e9) * 1e3
    bound_ms = (model_bytes + batch * state_rw) / (bw_gbs * 1e9) * 1e3
    med = metrics["decode_ms_per_token"]["median"]
    return {"batch": batch, "status": "ok", "metrics": metrics,
            "decode_tok_s": batch * 1e3 / med,
            "bound_ms_per_token": bound_ms,
            "frac_bandwidth_bound": bound_ms / med,
            "weights_bound_ms_per_token": weights_ms,
            "frac_weights_bound": weights_ms / med}


def format_table(res: dict) -> str:
    from tabulate import tabulate
    head = ["variant", "batch", "prefill ms", "decode ms/tok (p10-p90)", "tok/s", "MB", "peak RSS MB",
            "% bw bound", "% weights-only bound"]
    rows = []
    for name, v in res["variants"].items():
        if v["status"] != "ok":
            rows.append([name, "", v["status"], v.get("reason", ""), "", "", "", "", ""])
            continue
        peak = v.get("peak_gpu_bytes") or v.get("peak_rss_bytes")
        for c in v["cases"].values():
            if c["status"] != "ok":
                rows.append([name, c["batch"], "skipped", c["reason"], "", "", "", "", ""])
                continue
            d = c["metrics"]["decode_ms_per_token"]
            rows.append([name, c["batch"], f'{c["metrics"]["prefill_ms"]["median"]:.1f}',
                         f'{d["median"]:.2f} ({d["p10"]:.2f}-{d["p90"]:.2f})', f'{c["decode_tok_s"]:.1f}',
                         f'{v["model_bytes"] / 1e6:.1f}', "" if not peak else f"{peak / 1e6:.0f}",
                         f'{100 * c["frac_bandwidth_bound"]:.0f}',
                         f'{100 * c.get("frac_weights_bound", c["frac_bandwidth_bound"]):.0f}'])
    bw = res["bandwidth"]
    p = res["params"]
    return "\n".join([tabulate(rows, head, tablefmt="github"), "",
                      f'{p["model_name"]}: prompt {p["prompt_len"]} tokens, {p["gen_len"]} new tokens, '
                      f'bandwidth {bw["read_gbs"]:.1f} GB/s (start {bw["read_gbs_at_start"]:.1f}, end '
                      f'{bw["read_gbs_at_end"]:.1f}); load average {res.get("loadavg_after")}'])


def write(res: dict, out_path) -> Path:
    return schema.save(res, out_path)
