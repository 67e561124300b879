"""The Python API: load any model dfplan understands, generate ids or text, compress, save.

    import dfplan
    m = dfplan.load("runs/demo/student")          # packed artifact, checkpoint dir, hub id, preset:NAME
    print(m.generate_text("def fibonacci(n):", max_new_tokens=40))
    for piece in m.generate_text("The", max_new_tokens=40, stream=True, temperature=0.8, seed=0):
        print(piece, end="", flush=True)
    ids = m.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=8)          # greedy ids
    dfplan.compress(m, "layout:dfssm")                                      # formats swapped in place
    dfplan.save_packed(m, "runs/my-packed")
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import DfplanError
from ..formats import quant
from ..formats.apply import apply_plan
from ..formats.layouts import layout_names, layout_plan
from ..formats.plan import Plan
from ..kernels import select_backend
from ..loading import WEIGHT_FILES, load_config, load_model
from ..model import build_model
from ..packed import load_packed
from ..packed import save_packed as _save
from ..packed_files import MANIFEST
from ..prompting import check_fits
from ..textstream import TextTracker
from ..tokenizer import check_vocab, load_tokenizer
from ..tokenizer import eos_id as tokenizer_eos_id
from .cudagraph import graph_step_factory
from .decode import STATE_DTYPES, DecodeResult, DecodeStats, decode, state_dtype_of
from .heap import return_freed_memory
from .leanstep import lean_step_factory
from .sampling import Sampling
from .textgen import encode_prompts, stream_in_thread


class Model:
    """A loaded Mamba-2 LM (compressed or not) with its tokenizer and a decode loop.

    module: the torch model (dfplan.model.Mamba2LM, possibly with compressed modules);
    tokenizer: a `tokenizers.Tokenizer` or None; source: what it was loaded from.
    After each generate / generate_text call, `last_stats` holds prefill ms and decode tok/s.
    """

    def __init__(self, module, tokenizer=None, source: str = "", state_dtype="fp32",
                 cuda_graph: bool = True, prefill_chunk: int = 2048):
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.source = source
        self.state_dtype = state_dtype_of(state_dtype)
        self.state_dtype_origin = "argument"      # or "plan" / "default", set by load()
        self.cuda_graph = cuda_graph
        self.lean_step = True       # CPU: LeanStep (runtime/leanstep.py) where it applies
        self.prefill_chunk = int(prefill_chunk)
        self.last_stats: DecodeStats | None = None
        self.prepare()

    def prepare(self) -> "Model":
        """Do the one-time work now rather than inside the first prefill: unpack 2/3/4-bit
        codes, prepack the int8 head, build the correction caches, load the CPU kernels."""
        select_backend(torch.empty(0, device=self.device))
        with torch.no_grad():
            for mod in self.module.modules():
                for name in ("fast_weights", "head_weights"):
                    fn = getattr(mod, name, None)
                    if fn is not None and _materialized(mod):
                        fn()
        return self

    # -- plumbing ------------------------------------------------------------------------
    @property
    def config(self):
        return self.module.config

    @property
    def device(self) -> torch.device:
        return self.module.backbone.norm_f.weight.device

    @property
    def state_dtype_name(self) -> str:
        """"fp32" / "bf16" / "fp16": the SSM state precision generate() decodes with."""
        return {v: k for k, v in STATE_DTYPES.items()}[self.state_dtype]

    @property
    def plan(self):
        return getattr(self.module, "dfplan_plan", None)

    def to(self, device) -> "Model":
        self.module.to(device)
        return self

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, L) -> logits (B, L, vocab_padded)."""
        with torch.no_grad():
            return self.module(ids.to(self.device))

    def __repr__(self) -> str:
        plan = self.plan
        return (f"dfplan.Model({self.config.name!r}, source={self.source!r}, "
                f"plan={getattr(plan, 'solver', None) if plan else 'none'}, device={self.device})")

    def eos_id(self) -> int | None:
        if self.tokenizer is None:
            return None
        return tokenizer_eos_id(self.tokenizer)

    def _tokenizer(self):
        if self.tokenizer is None:
            raise DfplanError(f"{self.source or 'this model'} has no tokenizer.json; pass one: "
                              "dfplan.load(..., tokenizer='path/tokenizer.json' or a hub id), "
                              "or --tokenizer on the command line")
        return self.tokenizer

    def step_factory(self):
        """What decode(step_fn=) gets: builds the step the runtime uses for (model, cache,
        batch), or None for model.step. The bench times the same step."""
        if self.device.type == "cuda":
            return graph_step_factory if self.cuda_graph else None
        return lean_step_factory if self.lean_step else None

    # -- generation ------------------------------------------------------------------------
    def generate(self, input_ids, max_new_tokens: int = 32, *, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stop=None,
                 eos: bool = True, state_dtype=None):
        """Continue token ids.

        input_ids: (B, L) tensor -> (B, L + max_new_tokens) tensor (rows that stop early are
        padded with the eos id, or 0); or a list of id lists of any lengths -> list of lists
        (prompt + generated ids, each row as long as it ran). stop: strings (need a
        tokenizer) that end a row, the stop string itself excluded at the token level.
        """
        as_tensor = isinstance(input_ids, torch.Tensor)
        if as_tensor:
            if input_ids.dim() == 1:
                input_ids = input_ids[None]
            rows = [r for r in input_ids.to(torch.int64)]
        else:
            rows = [torch.as_tensor(list(r), dtype=torch.int64) for r in input_ids]
        res = self._run(rows, max_new_tokens, temperature, top_k, top_p, seed, stop, eos,
                        state_dtype, stream_emit=None)[0]
        full = [r.tolist() + t for r, t in zip(rows, res.tokens)]
        if not as_tensor:
            return full
        pad = self.eos_id() if eos and self.eos_id() is not None else 0
        width = input_ids.shape[1] + max_new_tokens
        out = torch.full((len(full), width), pad, dtype=torch.int64)
        for i, f in enumerate(full):
            out[i, :len(f)] = torch.tensor(f)
        return out

    def generate_text(self, prompt, max_new_tokens: int = 64, *, stream: bool = False,
                      temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                      seed: int | None = None, stop=None, eos: bool = True, state_dtype=None):
        """prompt str -> generated text (without the prompt); list of str -> list of texts.
        stream=True (one prompt) returns an iterator of text pieces as they are produced;
        their concatenation is the non-streamed text."""
        if stream:
            if not isinstance(prompt, str):
                raise DfplanError("stream=True takes one prompt string, not a list")

            def run(emit):
                self._text(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, eos,
                           state_dtype, emit)
            return stream_in_thread(run)
        return self._text(prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, eos,
                          state_dtype, None)

    def _text(self, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop, eos,
              state_dtype, emit):
        tok = self._tokenizer()
        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise DfplanError("no prompts given")
        rows = encode_prompts(tok, prompts)
        res, tracker = self._run(rows, max_new_tokens, temperature, top_k, top_p, seed, stop, eos,
                                 state_dtype, stream_emit=emit, track_text=True)
        texts = tracker.texts
        tracker.flush(texts[0])
        return texts[0] if single else texts

    def _run(self, rows, max_new_tokens, temperature, top_k, top_p, seed, stop, eos, state_dtype,
             stream_emit, track_text: bool = False) -> tuple[DecodeResult, TextTracker | None]:
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
            raise DfplanError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        sampling = Sampling(float(temperature), top_k, float(top_p))
        stops = _stops(stop)
        if not rows:
            raise DfplanError("no prompts given")
        V = self.config.vocab_size
        for i, r in enumerate(rows):
            if r.dim() != 1 or r.numel() == 0:
                raise DfplanError(f"prompt {i} is empty; give at least one token")
            if int(r.min()) < 0 or int(r.max()) >= V:
                raise DfplanError(f"prompt {i} has token ids outside [0, {V})")
        tracker = None
        eos_id = self.eos_id() if eos else None
        if stops or track_text or stream_emit is not None:
            tracker = TextTracker(self._tokenizer(), len(rows), stops,
                                  stream_row=0 if stream_emit is not None else None, emit=stream_emit,
                                  eos_id=eos_id)
        sd = self.state_dtype if state_dtype is None else state_dtype_of(state_dtype)
        res = decode(self.module, rows, max_new_tokens, sampling, seed=seed, eos_id=eos_id,
                     on_tokens=tracker, state_dtype=sd, prefill_chunk=self.prefill_chunk,
                     step_fn=self.step_factory())
        if self.module.backbone.norm_f.weight.device.type == "cpu":
            return_freed_memory()        # the state and prefill temporaries just freed
        if tracker is not None and stops:
            for i, stopped in enumerate(tracker.stopped):
                if stopped:     # ids up to and including the token that completed the stop string
                    res.tokens[i] = res.tokens[i][:len(tracker.ids[i])]
                    res.finished[i] = "stop"
        self.last_stats = res.stats
        return res, tracker


def _materialized(mod) -> bool:
    return all(b.device.type != "meta" for b in mod.buffers(recurse=False))


def _stops(stop) -> tuple[str, ...]:
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    stops = tuple(stop)
    if any(not isinstance(s, str) or not s for s in stops):
        raise DfplanError(f"stop must be non-empty strings, got {stop!r}")
    return stops


# -- loading ---------------------------------------------------------------------------------

def _estimate_bytes(path_or_id: str, dtype: torch.dtype | None) -> int | None:
    if path_or_id.startswith("preset:"):
        cfg = load_config(path_or_id)
        meta = build_model(cfg, device="meta")
        return meta.num_parameters() * (torch.finfo(dtype or torch.float32).bits // 8)
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        for f in ("model.safetensors",) + tuple(WEIGHT_FILES):
            if (p / f).exists():
                n = (p / f).stat().st_size
                # a bf16/fp16 file loaded as fp32 doubles; packed payloads load as stored
                return n * 2 if (dtype == torch.float32 and not (p / "manifest.json").exists()) else n
    return None


def load(path_or_id, *, tokenizer=None, dtype: torch.dtype | None = None, device=None,
         seed: int = 0, verify: bool = True, state_dtype=None, cuda_graph: bool = True,
         prefill_chunk: int = 2048) -> Model:
    """Load a packed artifact dir, a mamba_ssm / transformers checkpoint dir, a hub id
    (online, via huggingface_hub) or `preset:NAME` (random init from `seed`).

    tokenizer: a tokenizer.json path / folder / hub id overriding (or supplying) the model's.
    state_dtype: SSM state precision during decoding: "fp32", "bf16" or "fp16"; None (default):
    the one a packed artifact's plan records (`dfplan search --state-dtype`), else fp32.
    """
    if state_dtype is not None:
        state_dtype_of(state_dtype)                          # a bad value fails before loading

    src = os.fspath(path_or_id)
    need = _estimate_bytes(src, dtype)
    if need:
        check_fits(need, src)
    p = Path(src).expanduser()
    tok = None
    if p.is_dir() and (p / MANIFEST).exists():
        module = load_packed(p, dtype=dtype, device=device, verify=verify)
        if (p / "tokenizer.json").exists():
            tok = load_tokenizer(p / "tokenizer.json")
    elif src.startswith("preset:"):
        module, tok = load_model(src, random_init=True, dtype=dtype, device=device, seed=seed)
    else:
        module, tok = load_model(src, dtype=dtype, device=device)
    if tokenizer is not None:
        tok = load_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
        check_vocab(tok, module.config)
    plan = getattr(module, "dfplan_plan", None)
    origin = "argument"
    if state_dtype is None:
        planned = getattr(plan, "state_dtype", "fp32")
        state_dtype, origin = planned, ("plan" if planned != "fp32" else "default")
    m = Model(module, tok, source=src, state_dtype=state_dtype, cuda_graph=cuda_graph,
              prefill_chunk=prefill_chunk)
    m.state_dtype_origin = origin
    return m


def _module(model):
    return model.module if isinstance(model, Model) else model


def resolve_plan(plan, cfg):
    """A Plan, a plan.json path, or "layout:NAME" / a built-in layout name -> Plan."""
    if isinstance(plan, Plan):
        return plan
    s = os.fspath(plan)
    if s.startswith("layout:"):
        return layout_plan(s[len("layout:"):], cfg)
    if s in layout_names() and not Path(s).exists():
        return layout_plan(s, cfg)
    return Plan.from_json(s)


def compress(model, plan, *, seed: int = 0, fast_svd: bool = True, progress: bool = False):
    """Swap every compressible layer to its format under `plan`, in place (like torchao's
    quantize_). fast_svd: randomised low-rank SVD for the correction init (pack-speed);
    False keeps the accurate subspace iteration. Returns `model`."""

    mod = _module(model)
    p = resolve_plan(plan, mod.config)
    gen = torch.Generator().manual_seed(seed)
    with quant.lowrank_method("randomized" if fast_svd else "exact"):
        apply_plan(mod, p, generator=gen, progress=progress)
    if isinstance(model, Model):
        model.prepare()         # the new modules' one-time work (fast bit order, unpacking)
    return model


def save_packed(model, out_dir, *, tokenizer=None, plan=None):
    """Write the packed artifact of a compressed model (tokenizer: the model's own by default)."""

    mod = _module(model)
    if tokenizer is None and isinstance(model, Model):
        tokenizer = model.tokenizer
    if plan is None and getattr(mod, "dfplan_plan", None) is None:
        raise DfplanError("save_packed needs a compressed model: call dfplan.compress(model, plan) first")
    return _save(mod, plan, out_dir, tokenizer=tokenizer)
