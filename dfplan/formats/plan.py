"""The plan: which format every compressible weight gets, plus what produced it.

plan.json schema (version 1):
    {"format": "dfplan-plan", "version": 1,
     "specs": {"backbone.layers.0.mixer.in_proj": "bin+r16", "*.out_proj": "int4", ...},
     "default": "fp16", "model": {...}, "budget_bytes": int|null, "predicted_bytes": int|null,
     "predicted_kl": float|null, "solver": str|null, "notes": str, "provenance": {...},
     "state_dtype": "fp32"|"bf16"|"fp16", "state_kl": float|null, "state_bytes_per_token": int|null}
The last three are optional (written only when not the default; a file without them is an
fp32-state plan): the SSM state precision the runtime decodes with, the mean KL of a long
generation against the fp32 state measured when it was chosen (runtime/statekl.py), and the
SSM state bytes read + written per decoded token at batch 1 in that precision. They do not
change any weight, so hash() leaves them out.
A spec value is a format name (see formats/specs.py) or {"format": "bin+r16", "init": "zero"}.

Resolution: a key equal to a unit name wins; otherwise the LAST matching fnmatch pattern (in
file order) wins, so broad rules go first and exceptions after. Units nothing matches keep
`default`. A key matching no unit is an error (a typo must not silently keep fp16).
`model` may carry d_model / n_layer / vocab_size / d_in_proj ... which resolve() checks
against the config so a plan for one model is refused on another; vocab_size is compared
after padding (the embedding's rows), so a preset's plan fits its transformers-layout copy.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Mamba2Config
from ..errors import DfplanError
from ..fileio import write_json_atomic
from .specs import Keep, Spec, spec_from_json, spec_to_json
from .units import Unit, allowed_specs, compressible_units

PLAN_FORMAT = "dfplan-plan"
PLAN_VERSION = 1
_MODEL_KEYS = ("d_model", "n_layer", "vocab_size", "d_intermediate", "tie_embeddings")
_FIELDS = ("format", "version", "specs", "default", "model", "budget_bytes", "predicted_bytes",
           "predicted_kl", "solver", "notes", "provenance", "state_dtype", "state_kl", "state_bytes_per_token")
STATE_DTYPES = ("fp32", "bf16", "fp16")          # SSM state precision while decoding


def model_signature(cfg: Mamba2Config) -> dict:
    """What a plan records about its model so it can refuse a different one."""
    return {"name": cfg.name, **{k: getattr(cfg, k) for k in _MODEL_KEYS},
            "attn_layer_idx": list(cfg.attn_layer_idx)}


@dataclass(frozen=True)
class Plan:
    specs: dict = field(default_factory=dict)        # unit name or fnmatch pattern -> Spec
    default: Keep = Keep("fp16")
    model: dict = field(default_factory=dict)
    budget_bytes: int | None = None
    predicted_bytes: int | None = None
    predicted_kl: float | None = None
    solver: str | None = None
    notes: str = ""
    provenance: dict = field(default_factory=dict)
    state_dtype: str = "fp32"                         # SSM state precision for decoding
    state_kl: float | None = None                     # its measured mean KL vs the fp32 state
    state_bytes_per_token: int | None = None          # SSM state read + written per token, batch 1

    def __post_init__(self):
        if self.state_dtype not in STATE_DTYPES:
            raise DfplanError(f"plan state_dtype {self.state_dtype!r} is not one of {', '.join(STATE_DTYPES)}")
        if not isinstance(self.default, Keep):
            raise DfplanError(f"plan default must be fp32, bf16 or fp16, not {self.default}")
        for k, v in self.specs.items():
            if not isinstance(k, str) or not k:
                raise DfplanError(f"plan spec key {k!r} must be a non-empty unit name or pattern")
            if not hasattr(v, "nbytes"):
                raise DfplanError(f"plan spec for {k!r} is not a format: {v!r}")

    # resolution ------------------------------------------------------------------------
    def check_model(self, cfg: Mamba2Config) -> None:
        diffs = []
        for k, v in self.model.items():
            if k == "vocab_size":
                if not same_vocab_rows(v, cfg):
                    diffs.append(f"vocab_size={v} in the plan but {cfg.vocab_size} in the model "
                                 f"({cfg.vocab_padded:,} embedding rows, padded to a multiple of "
                                 f"{cfg.pad_vocab_size_multiple}, where the plan's would be {_rows(v, cfg)})")
                continue
            if k in _MODEL_KEYS and getattr(cfg, k) != v:
                diffs.append(f"{k}={v} in the plan but {getattr(cfg, k)} in the model")
            if k == "attn_layer_idx" and list(cfg.attn_layer_idx) != list(v):
                diffs.append(f"attn_layer_idx={v} in the plan but {list(cfg.attn_layer_idx)} in the model")
        if diffs:
            raise DfplanError("plan was made for a different model: " + "; ".join(diffs))

    def resolve(self, cfg: Mamba2Config) -> dict[str, Spec]:
        """unit name -> Spec for every compressible unit; validated against the unit shapes."""
        self.check_model(cfg)
        units = compressible_units(cfg)
        names = {u.name for u in units}
        exact = {k: v for k, v in self.specs.items() if k in names}
        patterns = [(k, v) for k, v in self.specs.items() if k not in names]
        used = set(exact)
        out: dict[str, Spec] = {}
        for u in units:
            spec = exact.get(u.name)
            for k, v in reversed(patterns):
                if fnmatch.fnmatchcase(u.name, k):
                    used.add(k)             # matched, even if shadowed by a later key
                    spec = v if spec is None else spec
            spec = spec if spec is not None else self.default
            _check_unit(u, spec)
            out[u.name] = spec
        unused = [k for k in self.specs if k not in used]
        if unused:
            shown = ", ".join(repr(k) for k in unused[:5]) + (" ..." if len(unused) > 5 else "")
            raise DfplanError(f"plan names {len(unused)} layer(s) the model lacks: {shown} "
                              f"(model {cfg.name}, {cfg.n_layer} layers; check names/patterns)")
        return out

    # (de)serialisation ---------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION,
                "specs": {k: spec_to_json(v) for k, v in self.specs.items()},
                "default": self.default.name, "model": dict(self.model),
                "budget_bytes": self.budget_bytes, "predicted_bytes": self.predicted_bytes,
                "predicted_kl": self.predicted_kl, "solver": self.solver, "notes": self.notes,
                "provenance": dict(self.provenance), **self._state_dict()}

    def _state_dict(self) -> dict:
        """The state fields, only when they say more than the default (older readers keep
        reading fp32-state plans)."""
        if self.state_dtype == "fp32" and self.state_kl is None and self.state_bytes_per_token is None:
            return {}
        return {"state_dtype": self.state_dtype, "state_kl": self.state_kl,
                "state_bytes_per_token": self.state_bytes_per_token}

    @classmethod
    def from_dict(cls, d: dict, where: str = "plan") -> "Plan":
        if not isinstance(d, dict):
            raise DfplanError(f"{where}: expected a JSON object")
        if d.get("format", PLAN_FORMAT) != PLAN_FORMAT:
            raise DfplanError(f"{where}: format {d.get('format')!r} is not a dfplan plan")
        if int(d.get("version", PLAN_VERSION)) > PLAN_VERSION:
            raise DfplanError(f"{where}: plan version {d['version']} is newer than this dfplan "
                              f"understands ({PLAN_VERSION}); upgrade dfplan")
        unknown = sorted(set(d) - set(_FIELDS))
        if unknown:
            raise DfplanError(f"{where}: unknown fields {unknown}")
        specs_in = d.get("specs", {})
        if not isinstance(specs_in, dict):
            raise DfplanError(f"{where}: 'specs' must be an object of name -> format")
        specs = {}
        for k, v in specs_in.items():
            try:
                specs[k] = spec_from_json(v, where=f"{where}: specs[{k!r}]")
            except DfplanError as e:
                msg = str(e)
                raise DfplanError(msg if msg.startswith(where) else f"{where}: specs[{k!r}]: {msg}") from None
        default = spec_from_json(d.get("default", "fp16"), where=f"{where}: default")
        for k, typ in (("budget_bytes", int), ("predicted_bytes", int), ("predicted_kl", (int, float)),
                       ("solver", str), ("notes", str), ("model", dict), ("provenance", dict),
                       ("state_dtype", str), ("state_kl", (int, float)), ("state_bytes_per_token", int)):
            v = d.get(k)
            if v is not None and (not isinstance(v, typ) or isinstance(v, bool)):
                raise DfplanError(f"{where}: field {k!r} has the wrong type ({type(v).__name__})")
        return cls(specs=specs, default=default, model=d.get("model") or {},
                   budget_bytes=d.get("budget_bytes"), predicted_bytes=d.get("predicted_bytes"),
                   predicted_kl=d.get("predicted_kl"), solver=d.get("solver"),
                   notes=d.get("notes") or "", provenance=d.get("provenance") or {},
                   state_dtype=_state_dtype(d.get("state_dtype"), where), state_kl=d.get("state_kl"),
                   state_bytes_per_token=d.get("state_bytes_per_token"))

    def to_json(self, path) -> None:
        write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path) -> "Plan":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise DfplanError(f"plan file {path} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DfplanError(f"cannot read plan {path}: {e}") from None
        return cls.from_dict(d, where=str(path))

    def hash(self) -> str:
        """sha256 of what decides the artifact (specs, default, model), not of notes/provenance."""
        core = {"specs": {k: spec_to_json(v) for k, v in self.specs.items()},
                "default": self.default.name, "model": self.model}
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    def with_(self, **kw) -> "Plan":
        from dataclasses import replace
        return replace(self, **kw)


def _state_dtype(v, where: str) -> str:
    if v is None:
        return "fp32"
    if v not in STATE_DTYPES:
        raise DfplanError(f"{where}: state_dtype {v!r} is not one of {', '.join(STATE_DTYPES)}")
    return v


def same_vocab_rows(plan_vocab, cfg: Mamba2Config) -> bool:
    """Whether a plan's recorded vocab_size gives the model's embedding / head shapes.

    A plan fixes formats for tensors, whose rows are the vocabulary padded to a multiple
    (mamba_ssm pads 50,277 to 50,288). A transformers-layout checkpoint stores the padded
    count as its vocab_size, so the same weights read as 50,277 from a mamba_ssm folder or a
    preset and as 50,288 from a transformers folder: both have 50,288 rows and take the same
    plan. The plan's count is padded with the model's multiple; any other difference in rows
    is another model."""
    return plan_vocab == cfg.vocab_size or _rows(plan_vocab, cfg) == cfg.vocab_padded


def _rows(plan_vocab, cfg: Mamba2Config):
    """A plan's vocab_size padded with the model's multiple (the value itself if not a count)."""
    if isinstance(plan_vocab, bool) or not isinstance(plan_vocab, int) or plan_vocab <= 0:
        return plan_vocab
    m = cfg.pad_vocab_size_multiple
    return -(-plan_vocab // m) * m


def _check_unit(u: Unit, spec: Spec) -> None:
    spec.validate(u.shape)   # DfplanError naming the format and shape
    if not allowed_specs(u)(spec):
        raise DfplanError(f"{u.name} ({u.kind}) cannot take {spec}: the embedding / lm_head "
                          f"take fp32/bf16/fp16 or row-wise int8/int4/int3/int2 only")

