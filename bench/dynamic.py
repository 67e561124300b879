"""`dfplan bench dynamic`: does a per-prompt support pay on this model?

For each prompt: prefill at full width (recording unit energies), greedy continuation of
`gen` tokens by the full model, then the same tokens teacher-forced through the sliced model
for every (fraction kept, support) pair:
- oracle: top-k units by true prompt energy (the best this signal can do);
- sketch: top-k recovered from m = m_frac * n random measurements per layer (OMP / Lasso);
- random: k units at random (what the energy signal is worth);
- static: top-k by the energies of the other prompts (leave-one-out): one support for every
  prompt, i.e. what plain structured pruning would give; dynamic support pays only above it.
Quality: KL(full || sliced) per continuation token (real vocabulary only) and top-1 agreement.
Speed: median decode-step time of the full and the sliced model (oracle support, batch 1) on
this machine, plus the per-prompt setup (recovery + gathering the kept weights).
"""
from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from dfplan.dynamic.masked import DynamicModel, bandwidth_bound_speedup, kept_weight_fraction
from dfplan.dynamic.recovery import sklearn_linear_model
from dfplan.dynamic.select import make_support, n_measurements, support_stats
from dfplan.dynamic.sketch import Energies, prompt_energies
from dfplan.dynamic.units import n_kept, unit_layout
from dfplan.errors import DfplanError
from dfplan.loading import load_any, load_model

from .common import metadata, timeit, write_results

RESULT_FILE = "dynamic.json"


@dataclass(frozen=True)
class DynamicBenchConfig:
    model: str
    corpus: tuple = ()
    tokenizer: str | None = None
    prompts: int = 4
    prompt_len: int = 128
    gen: int = 32
    keep: tuple = (0.25, 0.5, 0.75)
    m_fracs: tuple = (0.125, 0.25, 0.5)
    block: int | None = None
    mlp_block: int = 128
    sketch: str = "gaussian"
    recovery: str = "omp"
    seed: int = 0
    quality: bool = True
    speed: bool = True
    budget_s: float = 1.0
    threads: int | None = None


def _load(cfg: DynamicBenchConfig):
    if cfg.model.startswith("preset:"):
        return load_model(cfg.model, random_init=True, seed=cfg.seed)
    return load_any(cfg.model)


def _prompts(cfg: DynamicBenchConfig, model, tok) -> torch.Tensor:
    """(prompts, prompt_len) int64: corpus windows, or random ids when no corpus is given."""
    V = model.config.vocab_size
    if not cfg.corpus:
        g = torch.Generator().manual_seed(cfg.seed)
        return torch.randint(0, V, (cfg.prompts, cfg.prompt_len), generator=g)
    from dfplan.data import load_tokens, sample_windows
    from dfplan.tokenizer import check_vocab, load_tokenizer
    if cfg.tokenizer is not None:
        tok = load_tokenizer(cfg.tokenizer)
    if tok is None:
        raise DfplanError(f"{cfg.model} has no tokenizer.json; pass --tokenizer or no --corpus")
    check_vocab(tok, model.config)
    stream = load_tokens(list(cfg.corpus), tok)
    return torch.from_numpy(sample_windows(stream.tokens, cfg.prompts, cfg.prompt_len, cfg.seed)).long()


def _kl(p_logits: torch.Tensor, q_logits: torch.Tensor, V: int) -> torch.Tensor:
    """KL(p || q) per row over the real vocabulary (padding logits excluded)."""
    lp = F.log_softmax(p_logits[..., :V].float(), -1)
    lq = F.log_softmax(q_logits[..., :V].float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _continuation(model, logits, cache, gen: int):
    """Greedy tokens (gen, 1) fed at each step and the full model's logits after each."""
    c = copy.deepcopy(cache)
    nxt = logits[:, -1].argmax(-1)
    toks, outs = [], []
    for _ in range(gen):
        toks.append(nxt)
        out = model.step(nxt, c)
        outs.append(out)
        nxt = out.argmax(-1)
    return toks, torch.stack(outs)                               # [(1,)], (gen, 1, Vp)


def _score(model, dyn: DynamicModel, cache, toks, full_logits, V: int) -> tuple[float, float]:
    c = dyn.slice_cache(cache)
    outs = torch.stack([dyn.step(t, c) for t in toks])           # (gen, 1, Vp)
    kl = _kl(full_logits, outs, V)
    agree = (full_logits[..., :V].argmax(-1) == outs[..., :V].argmax(-1)).float()
    return float(kl.mean()), float(agree.mean())


def _variants(cfg: DynamicBenchConfig):
    for f in cfg.keep:
        yield f, "oracle", None
        for m in cfg.m_fracs:
            yield f, "sketch", m
        yield f, "random", None
        yield f, "static", None


def _leave_one_out(all_en: list[Energies], p: int) -> Energies | None:
    """Energies summed over every prompt but p: a static support's calibration data."""
    others = [e for i, e in enumerate(all_en) if i != p]
    if not others:
        return None
    keys = others[0].post
    return Energies({k: sum(e.post[k] for e in others) for k in keys},
                    {k: sum(e.pre[k] for e in others) for k in others[0].pre})


def _quality(cfg, model, layout, prompts) -> list[dict]:
    V = model.config.vocab_size
    acc: dict = {}
    all_en = [prompt_energies(model, prompts[p:p + 1], layout)[2] for p in range(prompts.shape[0])]
    for p in tqdm(range(prompts.shape[0]), desc="prompts", unit="prompt"):
        logits, cache, en = prompt_energies(model, prompts[p:p + 1], layout)
        toks, full = _continuation(model, logits, cache, cfg.gen)
        static_en = _leave_one_out(all_en, p)
        oracles = {}
        for f, kind, m in _variants(cfg):
            if kind == "static" and static_en is None:
                continue                               # one prompt: nothing to calibrate on
            t0 = time.perf_counter()
            if kind == "static":                       # top-k of the other prompts' energies
                sup = make_support("oracle", layout, static_en, f)
            else:
                sup = make_support(kind, layout, en, f, m_frac=m, sketch=cfg.sketch,
                                   method=cfg.recovery, seed=cfg.seed + p)
            t1 = time.perf_counter()
            dyn = DynamicModel(model, sup, layout)
            t2 = time.perf_counter()
            if kind == "oracle":                         # first for every fraction
                oracles[f] = sup
            kl, agree = _score(model, dyn, cache, toks, full, V)
            row = {"kl": kl, "top1_agree": agree, "support_s": t1 - t0, "slice_s": t2 - t1,
                   "weight_fraction": kept_weight_fraction(model, dyn),
                   **support_stats(layout, en, sup, oracles[f])}
            for k, v in row.items():
                acc.setdefault((f, kind, m), {}).setdefault(k, []).append(v)
    rows = []
    for (f, kind, m), vals in acc.items():
        rows.append({"keep": f, "support": kind, "m_frac": m,
                     **{k: sum(v) / len(v) for k, v in vals.items()}, "prompts": len(vals["kl"])})
    return rows


def _speed(cfg, model, layout, prompt) -> list[dict]:
    """Per fraction: the full and the sliced step timed back to back (same machine state)."""
    logits, cache, en = prompt_energies(model, prompt, layout)
    tok = logits[:, -1].argmax(-1)
    c_full = copy.deepcopy(cache)
    rows = []
    for f in tqdm(cfg.keep, desc="timing", unit="fraction"):
        t0 = time.perf_counter()
        sup = make_support("oracle", layout, en, f)
        dyn = DynamicModel(model, sup, layout)
        setup = time.perf_counter() - t0
        c = dyn.slice_cache(cache)
        t_full = timeit(lambda: model.step(tok, c_full), budget_s=cfg.budget_s, warmup=3)
        t_dyn = timeit(lambda: dyn.step(tok, c), budget_s=cfg.budget_s, warmup=3)
        rows.append({"keep": f, "full_ms": t_full.median_s * 1e3, "dynamic_ms": t_dyn.median_s * 1e3,
                     "speedup": t_full.median_s / t_dyn.median_s,
                     # best samples: less skewed by other work on a shared machine
                     "speedup_p10": t_full.p10_s / t_dyn.p10_s,
                     "bandwidth_bound_speedup": bandwidth_bound_speedup(model, dyn), "setup_s": setup,
                     "weight_fraction": kept_weight_fraction(model, dyn),
                     "full_timing": t_full.to_dict(), "dynamic_timing": t_dyn.to_dict()})
    return rows


def run_dynamic_bench(cfg: DynamicBenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    model, tok = _load(cfg)
    model.eval()
    if cfg.quality:
        sklearn_linear_model()    # import once here, not inside the first timed recovery
    layout = unit_layout(model, cfg.block, cfg.mlp_block)
    prompts = _prompts(cfg, model, tok)
    units = sorted({(g.kind, g.n_units) for g in layout})
    theory = {}
    for g in layout:
        for f in cfg.keep:
            k = n_kept(g, f)
            theory[f"{g.kind}:{g.n_units}:keep={f}"] = {
                "k": k, "k_log_n_over_k": k * math.log(g.n_units / k) if k < g.n_units else 0.0,
                "m": {str(m): n_measurements(g, m) for m in cfg.m_fracs}}
    res = {"config": asdict(cfg), "model_config": model.config.name, "units": units,
           "theory_m": theory, "metadata": metadata()}
    with torch.no_grad():
        if cfg.quality:
            res["quality"] = _quality(cfg, model, layout, prompts)
        if cfg.speed:
            res["speed"] = _speed(cfg, model, layout, prompts[:1])
    res["metadata"]["cpu_end_loadavg"] = list(os.getloadavg())
    return res


def format_table(res: dict) -> str:
    from tabulate import tabulate
    out = []
    if res.get("quality"):
        rows = [[r["keep"], r["support"], "" if r["m_frac"] is None else r["m_frac"],
                 f"{r['kl']:.4f}", f"{r['top1_agree']:.3f}", f"{r['energy_captured']:.3f}",
                 f"{r['oracle_recall']:.2f}", f"{r['weight_fraction']:.2f}",
                 f"{1e3 * (r['support_s'] + r['slice_s']):.1f}"] for r in res["quality"]]
        out.append(tabulate(rows, headers=["keep", "support", "m/n", "KL", "top1", "energy",
                                           "recall", "weights", "setup ms"]))
    if res.get("speed"):
        rows = [[r["keep"], f"{r['full_ms']:.3f}", f"{r['dynamic_ms']:.3f}", f"{r['speedup']:.2f}x",
                 f"{r['speedup_p10']:.2f}x", f"{r['bandwidth_bound_speedup']:.2f}x",
                 f"{r['weight_fraction']:.2f}", f"{1e3 * r['setup_s']:.1f}"]
                for r in res["speed"]]
        out.append(tabulate(rows, headers=["keep", "full ms/token", "dynamic ms/token", "speedup",
                                           "speedup p10", "bound", "weights", "setup ms"]))
    la = res["metadata"]["cpu"].get("loadavg_1m_5m_15m")
    out.append(f"load average at start {la}, at end {res['metadata'].get('cpu_end_loadavg')}")
    return "\n\n".join(out)


def write(res: dict, out_dir: str | Path) -> Path:
    return write_results(Path(out_dir) / RESULT_FILE, res)
