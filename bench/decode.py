"""`dfplan bench decode`: one model's decode speed as a fraction of its bandwidth bound, with
the bandwidth measured in the same run (twice, right after the decode, the higher used: its
buffers would otherwise count in the decode's peak RSS), and where the time per token goes
(dfplan/runtime/profile.py).

bound = bytes a batch-1 step moves (weights, the whole int8 head, the SSM state in the chosen
precision and the conv windows, read and written) / bandwidth. The fraction is given for the
best of `repeats` generations and for their median.
"""
from __future__ import annotations

import os
import statistics

from dfplan.runtime.profile import decode_benchmark

from .common import memory_bandwidth, metadata, write_results


def run_decode_bench(model: str, threads: int = 1, prompt_len: int = 100, new_tokens: int = 128,
                     state_dtype: str | None = None, repeats: int = 3, bandwidth_mib: int = 256) -> dict:
    res = decode_benchmark(model, threads, prompt_len, new_tokens, state_dtype, repeats)
    bw0 = memory_bandwidth("cpu", nbytes=bandwidth_mib << 20)
    bw1 = memory_bandwidth("cpu", nbytes=bandwidth_mib << 20)
    gbs = max(bw0["read_gbs"], bw1["read_gbs"])
    nbytes = res["profile"]["bytes_per_step"]
    median_tok_s = statistics.median(r["decode_tok_s"] for r in res["runs"])
    res["bandwidth"] = {"read_gbs": gbs, "read_gbs_at_start": bw0["read_gbs"], "read_gbs_at_end": bw1["read_gbs"]}
    res["bound_tok_s"] = gbs * 1e9 / nbytes["total"]
    res["frac_bound_best"] = res["decode_tok_s"] / res["bound_tok_s"]
    res["frac_bound_median"] = median_tok_s / res["bound_tok_s"]
    res["frac_weights_bound_best"] = res["decode_tok_s"] * nbytes["weights"] / (gbs * 1e9)
    res["metadata"] = metadata()
    res["loadavg_after"] = list(os.getloadavg())
    return res


def summary(res: dict) -> str:
    p = res["profile"]
    tot = sum(p["breakdown_ms"].values())
    parts = ", ".join(f"{k} {v:.2f} ms ({100 * v / tot:.0f}%)" for k, v in p["breakdown_ms"].items())
    return (f"{res['model']}: {res['threads']} thread(s), SSM state {res['state_dtype']}; prefill "
            f"{res['prompt_len']} tokens {res['prefill_ms']:.0f} ms; decode {res['decode_tok_s']:.1f} tok/s "
            f"(best of {len(res['runs'])}); bound {res['bound_tok_s']:.1f} tok/s "
            f"({p['bytes_per_step']['total'] / 1e6:.1f} MB per token at {res['bandwidth']['read_gbs']:.1f} GB/s): "
            f"{100 * res['frac_bound_best']:.0f}% (median run {100 * res['frac_bound_median']:.0f}%), "
            f"weights only {100 * res['frac_weights_bound_best']:.0f}%; peak RSS "
            f"{res['peak_rss_bytes'] / 1e6:.0f} MB; load average {res['loadavg_after']}\n"
            f"per token: {parts}")


def write(res: dict, path) -> str:
    return str(write_results(path, res))
