"""`dfplan bench kernels`: per-call time of the compressed linear kernels on a model's shapes.

For each unit shape (in_proj, out_proj, lm_head of a preset) and batch size, every
implementation is timed with its weights NOT in cache: the call rotates over enough distinct
copies of the weights that they exceed twice the last-level cache (L3 on CPU, L2 on GPU), so
each call streams its weights from memory, as decoding a real model does. The machine's
memory bandwidth is measured in the same run, giving effective GB/s (weight bytes / time),
the fraction of bandwidth and the ratio to the bandwidth bound (weight bytes / bandwidth).
"""
from __future__ import annotations

import gc
import itertools
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.kernels import cpu as cpu_kernels
from dfplan.kernels.dispatch import binary_linear, int8_linear, preferred_bits_layout
from dfplan.kernels.packing import ROW_BLOCKS, pack_signs, to_row_blocks

from .common import Timing, copies_to_exceed, l3_bytes, memory_bandwidth, metadata, timeit, write_results

CPU_IMPLS = ("bin", "bin+r16", "int8", "fbgemm-int8", "bf16", "fp32")
GPU_IMPLS = ("bin", "bin+r16", "int8", "fp16")
# the embedding / lm_head only takes Keep or IntN formats
HEAD_IMPLS = {"bin", "bin+r16"}


@dataclass(frozen=True)
class BenchConfig:
    model: str = "1.3b"
    batches: tuple = (1, 8)
    units: tuple = ("in_proj", "out_proj", "lm_head")
    impls: tuple | None = None        # None: every implementation for the device
    device: str = "cpu"
    budget_s: float = 1.0             # time budget per measurement
    rank: int = 16                    # rank of the bin+rN correction
    threads: int | None = None
    bandwidth_bytes: int = 256 << 20  # buffer for the same-run bandwidth measurement (> 2 x L3)


def unit_shapes(cfg: Mamba2Config) -> dict[str, tuple[int, int]]:
    """(out, in) of the three linear shapes that dominate a Mamba-2 decode step."""
    return {"in_proj": (cfg.d_in_proj, cfg.d_model), "out_proj": (cfg.d_model, cfg.d_inner),
            "lm_head": (cfg.vocab_padded, cfg.d_model)}


def _weights(impl: str, out_f: int, in_f: int, rank: int, device: str, g: torch.Generator):
    """(callable(x, w), one weight copy as a tuple of tensors, its payload bytes)."""
    W = torch.randn(out_f, in_f, generator=g)
    if impl.startswith("bin"):
        bits = pack_signs(W).to(device)
        layout = preferred_bits_layout(bits)     # the byte order the runtime decodes with
        if layout == ROW_BLOCKS:
            bits = to_row_blocks(bits)
        rs = W.abs().mean(1).half()
        w = [bits, rs]
        if "+r" in impl:
            w += [torch.randint(-127, 128, (out_f, rank), generator=g, dtype=torch.int8),
                  torch.rand(out_f, generator=g).half() * 0.01,
                  torch.randint(-127, 128, (rank, in_f), generator=g, dtype=torch.int8),
                  torch.rand(rank, generator=g).half() * 0.01]

            def fn(x, w):
                return binary_linear(x, w[0], w[1], in_f, u=w[2], u_scale=w[3], v=w[4], v_scale=w[5],
                                     layout=layout)
        else:
            def fn(x, w):
                return binary_linear(x, w[0], w[1], in_f, layout=layout)
    elif impl == "int8":
        s = W.abs().amax(1) / 127
        w = [torch.round(W / s[:, None]).clamp(-127, 127).to(torch.int8), s.half()]

        def fn(x, w):
            return int8_linear(x, w[0], w[1])
    elif impl == "fbgemm-int8":
        from torch.ao.nn.quantized.dynamic import Linear as DynLinear
        s = (W.abs().amax(1) / 127).double()
        with warnings.catch_warnings():  # torch deprecates quantized tensors; still the baseline
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(W, s, torch.zeros(out_f, dtype=torch.int64), 0,
                                            torch.qint8)
            m = DynLinear(in_f, out_f, bias_=False, dtype=torch.qint8)
            m.set_weight_bias(qw, None)
        w = [m]
        del W

        def fn(x, w):
            return w[0](x)
        return fn, w, out_f * in_f + 8 * out_f
    else:
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[impl]
        w = [W.to(dt)]

        def fn(x, w):
            return F.linear(x, w[0])
    w = [t.to(device) for t in w]
    return fn, w, sum(t.numel() * t.element_size() for t in w)


def _x_dtype(impl: str, device: str) -> torch.dtype:
    if impl == "bf16":
        return torch.bfloat16
    if device == "cuda":
        return torch.float16
    return torch.float32


def _measure(impl, unit, out_f, in_f, batches, cfg: BenchConfig, cache_bytes, bw_gbs, g):
    fn, w0, nbytes = _weights(impl, out_f, in_f, cfg.rank, cfg.device, g)
    n_copies = copies_to_exceed(nbytes, cache_bytes)
    copies = [w0] + [[t.clone() if isinstance(t, torch.Tensor) else _clone_module(t, impl, out_f,
                                                                                    in_f, g)
                      for t in w0] for _ in range(n_copies - 1)]
    rows = []
    for batch in batches:
        x = torch.randn(batch, in_f, generator=g).to(cfg.device, _x_dtype(impl, cfg.device))
        if cfg.device == "cuda":
            t = _time_cuda_graph(fn, x, copies, cfg.budget_s)
        else:
            it = itertools.cycle(copies)
            t = timeit(lambda: fn(x, next(it)), warmup=max(3, n_copies), budget_s=cfg.budget_s)
        bound = nbytes / (bw_gbs * 1e9)
        rows.append({"unit": unit, "out": out_f, "in": in_f, "batch": batch, "impl": impl,
                     "device": cfg.device, "median_ms": t.median_s * 1e3, "p10_ms": t.p10_s * 1e3,
                     "p90_ms": t.p90_s * 1e3, "samples": t.samples, "weight_bytes": nbytes,
                     "weight_copies": n_copies, "gbs": nbytes / t.median_s / 1e9,
                     "frac_bandwidth": nbytes / t.median_s / 1e9 / bw_gbs,
                     "bound_ms": bound * 1e3, "x_bound": t.median_s / bound})
    del copies, w0
    gc.collect()
    return rows


def _time_cuda_graph(fn, x, copies, budget_s) -> Timing:
    """Per-call GPU time with launch overhead removed: one CUDA graph holds one call per weight
    copy (kernels back to back, as in a graph-captured decode step); replays are timed."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / autotune outside the capture
        for w in copies:
            fn(x, w)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for w in copies:
            fn(x, w)
    t = timeit(graph.replay, warmup=3, budget_s=budget_s, device="cuda")
    n = len(copies)
    return Timing(t.median_s / n, t.p10_s / n, t.p90_s / n, t.samples, n)


def _clone_module(m, impl, out_f, in_f, g):
    # a quantized dynamic Linear owns a prepacked weight; build another from fresh weights
    fn, w, _ = _weights(impl, out_f, in_f, 0, "cpu", g)
    return w[0]


def run_kernel_bench(cfg: BenchConfig) -> dict:
    """Run the benchmark; returns the results dict (also what the CLI writes as JSON)."""
    if cfg.device not in ("cpu", "cuda"):
        raise DfplanError(f"bench kernels: device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise DfplanError("bench kernels: --device cuda but no CUDA device is visible")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mcfg = Mamba2Config.preset(cfg.model)
    shapes = unit_shapes(mcfg)
    bad = [u for u in cfg.units if u not in shapes]
    if bad:
        raise DfplanError(f"bench kernels: unknown unit(s) {bad}; choose from {', '.join(shapes)}")
    all_impls = CPU_IMPLS if cfg.device == "cpu" else GPU_IMPLS
    impls = tuple(cfg.impls or all_impls)
    bad = [i for i in impls if i not in all_impls]
    if bad:
        raise DfplanError(f"bench kernels: unknown implementation(s) {bad} on {cfg.device}; "
                          f"choose from {', '.join(all_impls)}")
    if cfg.device == "cpu" and any(i in ("bin", "bin+r16", "int8") for i in impls) \
            and not cpu_kernels.available():
        raise DfplanError(f"bench kernels: the CPU kernels are not built ({cpu_kernels.build_error()})")

    if cfg.device == "cuda":
        cache_bytes = int(getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20))
        cache_name = "GPU L2"
    else:
        cache_bytes, cache_name = l3_bytes(), "L3"
    bw_bytes = cfg.bandwidth_bytes * (1 if cfg.device == "cpu" else 4)
    bw = memory_bandwidth(cfg.device, nbytes=bw_bytes)
    bw_gbs = bw["read_gbs"]
    g = torch.Generator().manual_seed(0)
    rows = []
    with torch.inference_mode():
        for unit in cfg.units:
            out_f, in_f = shapes[unit]
            for impl in impls:
                if unit == "lm_head" and impl in HEAD_IMPLS:
                    continue
                rows += _measure(impl, unit, out_f, in_f, cfg.batches, cfg, cache_bytes, bw_gbs, g)
    # measured again at the end: on a shared machine bandwidth drifts; fractions and bounds
    # use the higher of the two (the conservative choice), both are recorded
    bw_end = memory_bandwidth(cfg.device, nbytes=bw_bytes)
    bw["read_gbs_at_start"] = bw["read_gbs"]
    bw["read_gbs_at_end"] = bw_end["read_gbs"]
    bw["copy_gbs_at_end"] = bw_end["copy_gbs"]
    bw["read_gbs"] = max(bw["read_gbs"], bw_end["read_gbs"])
    for r in rows:
        bound_s = r["weight_bytes"] / (bw["read_gbs"] * 1e9)
        r.update(frac_bandwidth=r["gbs"] / bw["read_gbs"], bound_ms=bound_s * 1e3,
                 x_bound=r["median_ms"] / (bound_s * 1e3))
    _add_ratios(rows)
    res = {
        "benchmark": "kernels",
        "config": {**cfg.__dict__, "batches": list(cfg.batches), "units": list(cfg.units),
                   "impls": list(impls)},
        "model_shapes": {u: list(s) for u, s in shapes.items()},
        "metadata": metadata(),
        "cpu_kernel_isa": cpu_kernels.ISA_NAMES.get(cpu_kernels.best_isa()) if cfg.device == "cpu" else None,
        "bin_bits_layout": ("row blocks" if preferred_bits_layout(torch.empty(1, dtype=torch.uint8,
                                                                              device=cfg.device))
                            else "rows"),
        "cache_policy": (f"weights rotated over distinct copies totalling > 2 x {cache_name} "
                         f"({cache_bytes >> 20} MiB) per implementation, so every call reads its "
                         "weights from memory"),
        "timing": ("per call, wall clock, median of samples" if cfg.device == "cpu" else
                   "one CUDA graph of back-to-back calls (one per weight copy) per sample, "
                   "divided by the number of calls"),
        "bandwidth": bw,
        "rows": rows,
        "checks": acceptance_checks(rows),
        "loadavg_after": _loadavg(),
    }
    return res


def _loadavg():
    import os
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _add_ratios(rows):
    base = {(r["unit"], r["batch"]): r["median_ms"] for r in rows if r["impl"] in ("fp32", "fp16")}
    for r in rows:
        b = base.get((r["unit"], r["batch"]))
        r["speedup_vs_float"] = b / r["median_ms"] if b else None


def acceptance_checks(rows) -> dict:
    """The issue's targets, evaluated on this run's numbers (None when not measured)."""
    def find(unit, impl, batch):
        return next((r for r in rows if r["unit"] == unit and r["impl"] == impl
                     and r["batch"] == batch), None)
    out = {}
    r = find("in_proj", "bin", 1)
    if r and r["device"] == "cpu":
        out["cpu_bin_in_proj_gemv_within_2x_of_bound"] = {"x_bound": r["x_bound"],
                                                           "pass": r["x_bound"] <= 2.0}
        if r["speedup_vs_float"] is not None:
            out["cpu_bin_in_proj_gemv_20x_faster_than_fp32"] = {
                "speedup": r["speedup_vs_float"], "pass": r["speedup_vs_float"] >= 20}
    if r and r["device"] == "cuda":
        out["gpu_bin_gemv_at_least_60pct_hbm"] = {
            u: {"frac": find(u, "bin", 1)["frac_bandwidth"],
                "pass": find(u, "bin", 1)["frac_bandwidth"] >= 0.6}
            for u in ("in_proj", "out_proj") if find(u, "bin", 1)}
    return out


def format_table(res: dict) -> str:
    from tabulate import tabulate
    head = ["unit", "out x in", "batch", "impl", "median ms", "GB/s", "% bw", "x bound", "vs float"]
    body = [[r["unit"], f'{r["out"]}x{r["in"]}', r["batch"], r["impl"], f'{r["median_ms"]:.3f}',
             f'{r["gbs"]:.1f}', f'{100 * r["frac_bandwidth"]:.0f}', f'{r["x_bound"]:.2f}',
             "" if r["speedup_vs_float"] is None else f'{r["speedup_vs_float"]:.1f}x']
            for r in res["rows"]]
    bw = res["bandwidth"]
    lines = [tabulate(body, head, tablefmt="github"), "",
             f'memory bandwidth ({res["config"]["device"]}, same run, best samples): read '
             f'{bw["read_gbs"]:.1f} GB/s (start {bw["read_gbs_at_start"]:.1f}, end '
             f'{bw["read_gbs_at_end"]:.1f}), copy {bw["copy_gbs"]:.1f} GB/s; load average '
             f'{res["metadata"]["cpu"].get("loadavg_1m_5m_15m")}',
             res["cache_policy"]]
    for name, c in res["checks"].items():
        lines.append(f"{name}: {c}")
    return "\n".join(lines)


def write(res: dict, out_dir) -> str:
    from pathlib import Path
    return str(write_results(Path(out_dir) / "kernels.json", res))
