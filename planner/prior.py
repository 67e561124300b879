"""Size-only prior: a pseudo-KL table for models whose sensitivity cannot be measured.

A preset with --random-init has no trained weights, so a sensitivity table would measure noise.
The planner still needs a score per (unit, format) to trade bytes against; this module gives a
fixed, documented one that encodes the layout preferences of DF-SSM (and Bi-Mamba / KL Lens):

    pseudo_kl(unit, spec) = KIND_WEIGHT[unit.kind] * nominal_error(spec, unit.shape)

nominal_error is a relative squared weight error, ||W_hat - W||^2 / ||W||^2:
  * Keep: fp32 0, fp16 4.3e-8, bf16 2.8e-6.
  * IntN: measured once with formats.quant (clip-searched, fp16 scales) on N(0, 1) weights of
    shape (512, 2048): int8 6.9e-5, int4 1.18e-2, int3 4.05e-2, int2 0.149 per row; groups
    and asymmetric codes multiply these by the factors in _GROUP_FACTOR / _ASYM_FACTOR.
  * Binary: 1 - 2/pi = 0.363 (sign with the row mean |w| as scale; FBI measures the same),
    reduced by a low-rank correction capturing CAPTURE * (1 - 2^(-r / r_half)) of it, with
    r_half = max(4, min(out, in) / 128) (16 for a 2048-wide layer): more rank is always
    better with diminishing returns (rank 16 removes 30% of the error, 32 45%, 128 60%).
    Random matrices have no such low-rank structure; trained weights do, and DF-SSM's
    rank-16 correction halves the scaffold's perplexity, which is what this curve stands for.
    A correction stored with fewer than 8 bits captures a little less (factor 1 - int error).
KIND_WEIGHT: 1 for every linear (each projection's relative output error enters the residual
stream once), times (out + in) / (mean out + in of the linears) so that one rank of correction
is worth the same per byte everywhere and corrections spread evenly; 1000 for the tied embedding (it is both the token lookup and the output head;
DF-SSM, Bi-Mamba and KL Lens all keep it at >= 8 bits; the weight makes int4 worse than any
realistic amount of correction rank the saved bytes could buy), 500 for an untied lm_head.
No position dependence: the prior spreads corrections evenly across depth, as DF-SSM does.

With these numbers the exact solver, given 278 MB on mamba2-1.3b, picks DF-SSM's layout:
int8 embedding, 1-bit in_proj / out_proj, corrections of rank 16-32 spread over all layers.
A plan made from this prior carries no quality claim; its notes say so.
"""
from __future__ import annotations

from dfplan.config import Mamba2Config
from dfplan.formats.specs import DEFAULT_CANDIDATES, Binary, IntN, Keep, Spec
from dfplan.formats.units import Unit, compressible_units

from .space import candidate_specs
from .surrogate import Surrogate

NOTE = "size-only prior: no quality claim (pseudo-KL from planner/prior.py, no sensitivity measured)"

KEEP_ERROR = {"fp32": 0.0, "fp16": 4.3e-8, "bf16": 2.8e-6}
INT_ERROR = {8: 6.9e-5, 4: 1.18e-2, 3: 4.05e-2, 2: 0.149}
_GROUP_FACTOR = {8: 0.61, 4: 0.875, 3: 0.95, 2: 0.98}     # group 128 vs per row (measured)
_ASYM_FACTOR = {8: 0.89, 4: 0.99, 3: 0.99, 2: 1.0}
BINARY_ERROR = 0.3634          # 1 - 2/pi
CAPTURE = 0.6                  # largest share of the scaffold error a correction removes
KIND_WEIGHT = {"embedding": 1000.0, "lm_head": 500.0, "in_proj": 1.0, "out_proj": 1.0,
               "attn_in": 1.0, "attn_out": 1.0, "fc1": 1.0, "fc2": 1.0}


def nominal_error(spec: Spec, shape) -> float:
    """Relative squared weight error the prior assumes for `spec` on a weight of `shape`."""
    if isinstance(spec, Keep):
        return KEEP_ERROR[spec.dtype]
    if isinstance(spec, IntN):
        e = INT_ERROR[spec.bits]
        if spec.group:
            e *= _GROUP_FACTOR[spec.bits]
        if not spec.symmetric:
            e *= _ASYM_FACTOR[spec.bits]
        return e
    if isinstance(spec, Binary):
        if not spec.rank:
            return BINARY_ERROR
        r_half = max(4.0, min(shape) / 128.0)
        captured = CAPTURE * (1.0 - 2.0 ** (-spec.rank / r_half)) * (1.0 - INT_ERROR[spec.rank_bits])
        return BINARY_ERROR * (1.0 - captured)
    raise TypeError(f"unknown spec {spec!r}")


def unit_weight(unit: Unit, mean_width: float) -> float:
    """KIND_WEIGHT, times (out + in) / mean (out + in) over the model's linears for a linear:
    out + in is what one rank of correction costs in bytes, so a given rank is worth the same
    per byte in every projection and corrections spread evenly (the mean keeps the average
    linear weight at 1, so the embedding's weight keeps its meaning across model sizes)."""
    w = KIND_WEIGHT[unit.kind]
    if unit.kind in ("embedding", "lm_head"):
        return w
    return w * (unit.shape[0] + unit.shape[1]) / mean_width


def pseudo_kl(unit: Unit, spec: Spec, mean_width: float) -> float:
    return unit_weight(unit, mean_width) * nominal_error(spec, unit.shape)


def prior_surrogate(cfg: Mamba2Config, candidates=DEFAULT_CANDIDATES) -> Surrogate:
    """A Surrogate scoring every allowed candidate of every unit with the pseudo-KL above."""
    units = compressible_units(cfg)
    widths = [u.shape[0] + u.shape[1] for u in units if u.kind not in ("embedding", "lm_head")]
    mean_width = sum(widths) / len(widths) if widths else 1.0
    kl = {u.name: {s.name: pseudo_kl(u, s, mean_width) for s in candidate_specs(u, candidates)}
          for u in units}
    return Surrogate(kl, source="prior", provenance={"prior": "planner/prior.py", "note": NOTE})
