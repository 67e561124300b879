"""Which model the run is about, and a refusal when its artifacts disagree.

Every stage records the model it worked on: the teacher's config.json, sensitivity.json
(`model.config`), each plan.json (`model`: name, d_model, n_layer, vocab_size, ...), the packed
student's config.json. A report over artifacts of two different models would put numbers side
by side that have nothing to do with each other, so the first disagreement stops it, naming both
files and both models.
"""
from __future__ import annotations

from dfplan.config import EXTRA_FIELDS, Mamba2Config
from dfplan.errors import DfplanError
from dfplan.formats.plan import Plan
from dfplan.loading import EXTRA_FILE, config_from_hf, is_hf_config

from .run import RunDir, Variant

KEYS = ("d_model", "n_layer", "vocab_size")


def _describe(sig: dict) -> str:
    name = sig.get("name")
    dims = ", ".join(f"{k}={sig[k]}" for k in KEYS if k in sig)
    return f"{name} ({dims})" if name and name != "custom" else dims


def signatures(run: RunDir, variants: list[Variant]) -> list[tuple[str, dict, dict | None]]:
    """(artifact, {d_model, n_layer, vocab_size[, name]}, full config dict or None) per artifact
    that names its model."""
    out = []
    d = run.json("teacher/config.json", "model config")
    if d is not None:
        out.append(("teacher/config.json", {k: d[k] for k in KEYS if k in d}, d))
    s = run.json("sensitivity.json", "sensitivity provenance (calibration, command)")
    if s is not None and isinstance((s.get("model") or {}).get("config"), dict):
        c = s["model"]["config"]
        out.append(("sensitivity.json", {k: c[k] for k in KEYS if k in c}, c))
    for v in variants:
        p = run.json(v.rel("plan.json"), "plan")
        m = (p or {}).get("model") or {}
        if m:
            out.append((v.rel("plan.json"), {**{k: m[k] for k in KEYS if k in m}, "name": m.get("name")}, None))
        sc = run.json(v.rel("student/config.json"), "packed student's model config")
        c = (sc or {}).get("dfplan_config")
        if isinstance(c, dict):
            out.append((v.rel("student/config.json"), {k: c[k] for k in KEYS if k in c}, c))
    return out


def check_fingerprints(run: RunDir, variants: list[Variant]) -> None:
    """run.json (written by the stage commands) fingerprints the model a folder's outputs came
    from; the run folder and its plan subfolders must agree."""
    seen = None
    for rel in ["run.json"] + [v.rel("run.json") for v in variants if v.prefix]:
        d = run.json(rel, "the model each command of the folder ran on (fingerprint)")
        if not d or not d.get("fingerprint"):
            continue
        if seen is None:
            seen = (rel, d)
        elif d["fingerprint"] != seen[1]["fingerprint"]:
            raise DfplanError(f"artifacts from different models in {run.root}: {seen[0]} is for model "
                              f"{seen[1].get('model')!r} ({str(seen[1]['fingerprint'])[:12]}) but {rel} is for "
                              f"{d.get('model')!r} ({str(d['fingerprint'])[:12]}); render each run directory on its own")


def check_and_config(run: RunDir, variants: list[Variant]) -> tuple[Mamba2Config | None, str]:
    """Refuse mixed models; -> (the run's model config or None, the model argument it came from)."""
    check_fingerprints(run, variants)
    sigs = signatures(run, variants)
    base = None
    for rel, sig, _ in sigs:
        if base is None:
            base = (rel, sig)
            continue
        diff = [k for k in KEYS if k in sig and k in base[1] and sig[k] != base[1][k]]
        if diff:
            raise DfplanError(f"artifacts from different models in {run.root}: {base[0]} is for "
                              f"{_describe(base[1])} but {rel} is for {_describe(sig)}; "
                              f"render each run directory on its own")
    for rel, _, full in sigs:
        if full is not None:
            if rel.endswith("config.json") and not is_hf_config(full):
                # what mamba_ssm's config.json cannot hold (the norm epsilon) lies beside it
                extra_rel = rel[:-len("config.json")] + EXTRA_FILE
                full = {**full, **{k: v for k, v in (run.json(extra_rel, "model config: fields mamba_ssm's "
                                                               "config.json cannot hold") or {}).items()
                                   if k in EXTRA_FIELDS}}
            try:
                cfg = config_from_hf(full, "model") if is_hf_config(full) else Mamba2Config.from_dict(full, "model")
            except (DfplanError, TypeError, ValueError) as e:
                raise DfplanError(f"{run.path(rel)} is corrupt (not a model config: {e})") from None
            arg = str(run.path(rel).parent) if rel.endswith("config.json") else ""
            return cfg, arg
    # a plan for a preset (dfplan search --model preset:NAME) names it in its provenance
    for v in variants:
        p = run.json(v.rel("plan.json"), "plan") or {}
        model = (p.get("provenance") or {}).get("model")
        if isinstance(model, str) and model.startswith("preset:"):
            try:
                return Mamba2Config.preset(model), model
            except DfplanError:
                pass
    return None, ""


def load_plans(run: RunDir, variants: list[Variant], cfg) -> dict:
    """variant name -> Plan (validated; resolved against the model when its config is known)."""
    plans = {}
    for v in variants:
        rel = v.rel("plan.json")
        d = run.json(rel, "plan")
        try:
            plan = Plan.from_dict(d, where=str(run.path(rel)))
        except DfplanError as e:
            raise DfplanError(f"{run.path(rel)} is corrupt ({e}); rerun `dfplan search`") from None
        if cfg is not None:
            try:
                plan.resolve(cfg)
            except DfplanError as e:
                raise DfplanError(f"artifacts from different models in {run.root}: {rel} does not fit "
                                  f"the run's model ({e})") from None
        plans[v.name] = plan
    return plans


def plan_consistency(run: RunDir, variants: list[Variant], plans: dict) -> list[str]:
    """Warnings (not errors) when a packed student was distilled from another plan than the
    plan.json beside it: the search was rerun after distillation."""
    out = []
    for v in variants:
        m = run.json(v.rel("student/manifest.json"), "packed payload bytes (checked against the plan)")
        packed = run.json(v.rel("student/plan.json"), "the plan stored in the packed student (checked)")
        if packed is not None:
            try:
                ph = Plan.from_dict(packed, where=str(run.path(v.rel("student/plan.json")))).hash()
            except DfplanError as e:
                raise DfplanError(f"{run.path(v.rel('student/plan.json'))} is corrupt ({e}); rerun `dfplan distill`") from None
            if ph != plans[v.name].hash():
                out.append(f"{v.rel('student/plan.json')} differs from {v.rel('plan.json')}: the student was "
                           f"distilled from another plan; rerun `dfplan distill` to match")
        if m and m.get("plan_hash") and m["plan_hash"] != plans[v.name].hash():
            out.append(f"{v.rel('student/')} was distilled from plan {m['plan_hash'][:12]}, not from "
                       f"{v.rel('plan.json')} ({plans[v.name].hash()[:12]}): rerun `dfplan distill` to match")
    return out
