"""What `dfplan bench e2e` can time, by name, and the runners that time one sample each.

A variant is prepared in the parent (artifacts built once into the cache: the reference
checkpoint in transformers layout, the packed artifact, GGUF files) and then run in a worker
(its own process by default). A runner's `sample(batch, P, G, seed)` times one prefill of a
P-token random prompt (including picking the first token) and G greedy decode steps, and
returns (prefill seconds, decode seconds for the G steps). On CUDA the times come from CUDA
events. Anything a variant needs but lacks (a library, a GPU, a built llama.cpp) makes it
`skipped` with the reason, never an error.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from dfplan.config import Mamba2Config
from dfplan.errors import DfplanError
from dfplan.runtime.decode import state_bytes

from .peers import find_llama_cpp, import_llama_cpp

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# llama.cpp GGUF types and their bits per weight (ggml block sizes), for memory estimates
GGUF_TYPES = {"q8_0": 8.5, "q4_0": 4.5, "tq2_0": 2.0625, "tq1_0": 1.6875, "f16": 16.0}


@dataclass
class Prepared:
    """Everything a worker needs to build its runner (plain data: crosses a process boundary)."""
    kind: str                      # dfplan | hf | llamacpp | mamba_ssm
    path: str                      # checkpoint / artifact / gguf file
    device: str
    threads: int | None
    dtype: str = "fp32"
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    kind: str
    dtype: str = "fp32"
    devices: tuple = ("cpu", "cuda")
    max_batch: int | None = None   # llama-cpp-python's Llama drives one sequence
    option: str = ""               # GGUF type, cg on/off, ...


VARIANTS: dict[str, Variant] = {v.name: v for v in [
    Variant("dfplan-packed", "dfplan packed artifact (--packed, or --plan / --layout applied; "
            "default layout dfssm)", "dfplan-packed"),
    *[Variant(f"dfplan-packed-state-{sd}", f"dfplan packed artifact decoding with a {sd} SSM state "
              "(half the state traffic; quality cost: dfplan search --state-dtype auto)",
              "dfplan-packed", option=f"state={sd}") for sd in ("bf16", "fp16")],
    *[Variant(f"dfplan-lite{'' if sd == 'fp32' else '-state-' + sd}",
              f"dfplan packed artifact on the torch-free runtime (dfplan.lite, its own process without "
              f"torch){'' if sd == 'fp32' else f', {sd} SSM state'}", "dfplan-lite", devices=("cpu",),
              max_batch=1, option=f"state={sd}") for sd in ("fp32", "bf16")],
    Variant("dfplan-fp32", "dfplan model, fp32", "dfplan", "fp32"),
    Variant("dfplan-bf16", "dfplan model, bf16", "dfplan", "bf16"),
    Variant("dfplan-fp16", "dfplan model, fp16", "dfplan", "fp16"),
    Variant("hf-fp32", "transformers Mamba2ForCausalLM (torch path), fp32", "hf", "fp32"),
    Variant("hf-fp16", "transformers Mamba2ForCausalLM, fp16", "hf", "fp16", devices=("cuda",)),
    *[Variant(f"llamacpp-{t}", f"llama.cpp (llama-cpp-python) GGUF {t.upper()}", "llamacpp",
              devices=("cpu",), max_batch=1, option=t) for t in ("q8_0", "q4_0", "tq2_0", "tq1_0")],
    Variant("llamacpp-tq1_0-all", "llama.cpp GGUF TQ1_0 with the embedding / output ternary too "
            "(equal-size comparison)", "llamacpp", devices=("cpu",), max_batch=1, option="tq1_0-all"),
    Variant("mamba-ssm-cg", "mamba-ssm MambaLMHeadModel.generate fp16, cg=True (its benchmark script)",
            "mamba_ssm", "fp16", devices=("cuda",), option="cg"),
    Variant("mamba-ssm-nocg", "mamba-ssm MambaLMHeadModel.generate fp16, cg=False",
            "mamba_ssm", "fp16", devices=("cuda",), option="nocg"),
]}
DEFAULT_CPU = ("dfplan-packed", "dfplan-lite", "dfplan-fp32", "hf-fp32", "llamacpp-q8_0", "llamacpp-q4_0",
               "llamacpp-tq2_0", "llamacpp-tq1_0")
DEFAULT_CUDA = ("dfplan-packed", "dfplan-fp16", "mamba-ssm-cg", "mamba-ssm-nocg")


def resolve_names(names, device: str) -> list[Variant]:
    names = list(names or (DEFAULT_CPU if device == "cpu" else DEFAULT_CUDA))
    bad = [n for n in names if n not in VARIANTS]
    if bad:
        raise DfplanError(f"unknown variant(s) {', '.join(bad)}; known: {', '.join(VARIANTS)}")
    return [VARIANTS[n] for n in dict.fromkeys(names)]


# availability ---------------------------------------------------------------------------------
def _has(mod: str) -> bool:
    try:
        return importlib.util.find_spec(mod) is not None
    except (ImportError, ValueError):
        return False


def unavailable(v: Variant, device: str, cfg: Mamba2Config | None = None) -> str | None:
    """Why `v` cannot run here (None when it can). Cheap: no model is loaded."""
    if v.option.endswith("-all") and cfg is not None and cfg.d_model % 256:
        # llama.cpp's ternary blocks are 256 wide; forcing them on the embedding has no fallback
        return f"{v.option.removesuffix('-all').upper()} on every tensor needs d_model % 256 == 0 (d_model={cfg.d_model})"
    if device not in v.devices:
        return f"runs on {' / '.join(v.devices)} only (this run: {device})"
    if v.kind == "hf" and not _has("transformers"):
        return "transformers is not installed (pip install 'dfplan[peers]')"
    if v.kind == "llamacpp":
        found, why = find_llama_cpp()
        if found is None:
            return f"llama.cpp is not built: {why}"
        try:
            import_llama_cpp()
        except (ImportError, OSError) as e:
            return f"llama-cpp-python cannot be imported ({type(e).__name__}: {e}); run `make peers`"
    if v.kind == "mamba_ssm" and not _has("mamba_ssm"):
        return "mamba-ssm is not installed (pip install 'dfplan[gpu]', needs CUDA)"
    return None


def state_rw_bytes(cfg: Mamba2Config, state_dtype: str = "fp32") -> int:
    """Recurrent-state bytes one sequence's decode step reads and writes: the SSM state in
    `state_dtype` (peers keep it in their compute dtype, Variant.dtype: fp32 on CPU,
    llama.cpp's too) plus the conv windows."""
    b = state_bytes(cfg, state_dtype)
    return b["ssm_state_rw"] + b["conv_state_rw"]


def n_params(cfg: Mamba2Config) -> int:
    from dfplan.model import build_model
    return build_model(cfg, device="meta").num_parameters()


def resident_bytes(v: Variant, cfg: Mamba2Config, packed_bytes: int | None) -> int:
    """Rough resident size of the weights once loaded (for the before-start memory check)."""
    n = n_params(cfg)
    if v.kind in ("dfplan-packed", "dfplan-lite"):
        return packed_bytes or n
    if v.kind in ("dfplan", "hf", "mamba_ssm"):
        return n * torch.finfo(DTYPES[v.dtype]).bits // 8
    bits = GGUF_TYPES.get(v.option.removesuffix("-all"), 16.0)
    return int(n * bits / 8)


# preparation (parent process; artifacts cached) -------------------------------------------------
@dataclass
class Sources:
    """The weights every variant is built from, materialised once under `cache`."""
    model: str
    random_init: bool
    seed: int
    cache: Path
    cfg: Mamba2Config
    packed: str | None = None      # an existing packed artifact
    plan: str = "dfssm"            # plan.json or a layout name, when the packed artifact is built
    log: Callable[[str], None] = print

    def reference(self) -> Path:
        """fp32 checkpoint in transformers layout (loads in dfplan, transformers, the GGUF converter).

        A tied head is stored once (no lm_head copy): transformers re-ties it and llama.cpp
        then uses token_embd as the output, as for the released mamba2 checkpoints."""
        d = self.cache / "reference-hf"
        if (d / "config.json").exists() and (d / "model.safetensors").exists():
            return d
        from safetensors.torch import save_file

        from dfplan.fileio import atomic_path, write_json_atomic
        from dfplan.loading import config_to_hf, load_model
        self.log(f"writing the reference checkpoint {d}")
        model, _ = load_model(self.model, random_init=self.random_init, dtype=torch.float32,
                              seed=self.seed)
        sd = {("backbone.embeddings." + k[len("backbone.embedding."):]
               if k.startswith("backbone.embedding.") else k): v.contiguous()
              for k, v in model.state_dict().items()}
        d.mkdir(parents=True, exist_ok=True)
        with atomic_path(d / "model.safetensors") as tmp:
            save_file(sd, str(tmp), metadata={"format": "pt"})
        write_json_atomic(d / "config.json", config_to_hf(model.config))
        del model, sd
        return d

    def packed_dir(self) -> Path:
        if self.packed:
            return Path(self.packed)
        tag = Path(self.plan).stem if self.plan.endswith(".json") else self.plan
        d = self.cache / f"packed-{tag}"
        if (d / "manifest.json").exists():
            return d
        from dfplan.loading import load_model
        from dfplan.runtime.api import compress, save_packed
        self.log(f"packing with {self.plan} into {d}")
        model, _ = load_model(str(self.reference()), dtype=torch.float32)
        compress(model, self.plan, seed=self.seed)
        save_packed(model, d)
        del model
        return d

    def gguf(self, qtype: str) -> Path:
        found, why = find_llama_cpp()
        if found is None:
            raise DfplanError(f"llama.cpp is not built: {why}")
        src = self.cache / "model-f32.gguf"
        if not src.exists():
            self.log(f"converting to GGUF with {found.src / 'convert_hf_to_gguf.py'}")
            tmp = src.with_suffix(".tmp.gguf")
            _run([sys.executable, str(found.src / "convert_hf_to_gguf.py"), str(self.reference()),
                  "--outtype", "f32", "--outfile", str(tmp)], "convert_hf_to_gguf.py", tmp)
            os.replace(tmp, src)
        out = self.cache / f"model-{qtype}.gguf"
        if not out.exists():
            base = qtype.removesuffix("-all")
            extra = []
            if qtype.endswith("-all"):  # every tensor ternary, the embedding / output head too
                extra = ["--token-embedding-type", base, "--output-tensor-type", base]
            tmp = out.with_suffix(".tmp.gguf")
            self.log(f"llama-quantize {qtype}")
            _run([str(found.quantize), *extra, str(src), str(tmp), base.upper()], "llama-quantize", tmp)
            os.replace(tmp, out)
        return out


def _run(cmd: list[str], what: str, tmp: Path) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        tmp.unlink(missing_ok=True)
        lines = (r.stderr or r.stdout).strip().splitlines()
        key = [ln for ln in lines if any(w in ln for w in ("GGML_ASSERT", "error", "Error"))]
        raise RuntimeError(f"{what} failed ({r.returncode}): {' | '.join((key or lines)[-2:])}")


def prepare(v: Variant, src: Sources, device: str, threads: int | None) -> Prepared:
    """Build (or find in the cache) what `v` loads. May raise: the caller marks it failed."""
    if v.kind == "dfplan-packed":
        opts = {"state_dtype": v.option.split("=", 1)[1]} if v.option.startswith("state=") else {}
        return Prepared("dfplan", str(src.packed_dir()), device, threads, "packed", opts)
    if v.kind == "dfplan-lite":
        return Prepared("lite", str(src.packed_dir()), device, threads, "packed",
                        {"state_dtype": v.option.split("=", 1)[1]})
    if v.kind in ("dfplan", "hf", "mamba_ssm"):
        return Prepared(v.kind, str(src.reference()), device, threads, v.dtype,
                        {"cg": v.option == "cg"})
    if v.kind == "llamacpp":
        return Prepared("llamacpp", str(src.gguf(v.option)), device, threads)
    raise AssertionError(v.kind)


# runners (worker process) -----------------------------------------------------------------------
class _Clock:
    """Elapsed seconds between marks: CUDA events on a GPU (no host sync inside the region)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return _perf()

    def seconds(self, a, b) -> float:
        if self.cuda:
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a


def _perf() -> float:
    import time
    return time.perf_counter()


def _prompt(batch: int, P: int, vocab: int, seed: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, min(vocab, 1000), (batch, P), generator=g).to(device)  # (B, P)


class DfplanRunner:
    """dfplan.load + the runtime's own chunked prefill and decode step, exactly as
    `dfplan generate` runs them: LeanStep on CPU, the CUDA graph on a GPU, the SSM state in
    the artifact plan's precision unless the variant names one."""

    def __init__(self, p: Prepared):
        from dfplan.runtime.api import load
        dtype = None if p.dtype == "packed" else DTYPES[p.dtype]
        self.model = load(p.path, dtype=dtype, device=p.device,
                          state_dtype=p.options.get("state_dtype"))
        self.module = self.model.module
        self.device = p.device
        self.vocab = self.module.config.vocab_size
        self.state_dtype = self.model.state_dtype_name        # recorded in the result
        self.state_rw_bytes = state_rw_bytes(self.module.config, self.state_dtype)
        if p.dtype == "packed":
            self.model_bytes = int(self.module.dfplan_manifest["payload_bytes"])
        else:
            self.model_bytes = sum(t.numel() * t.element_size() for t in self.module.state_dict().values())
        self.caches: dict[int, tuple] = {}
        # validating the regression gate: DFPLAN_BENCH_SLOWDOWN=0.3 makes every decode step and
        # prefill 30% slower (busy wait), a "build slowed on purpose" that compare must flag
        self.slowdown = float(os.environ.get("DFPLAN_BENCH_SLOWDOWN", "0") or 0)

    def _spin(self, seconds: float) -> None:
        end = _perf() + seconds * self.slowdown
        while _perf() < end:
            pass

    def _cache(self, batch: int):
        # one static cache (and CUDA graph) per batch size, reset in place before each sample
        if batch not in self.caches:
            cache = self.module.new_cache(batch, device=self.device, state_dtype=self.model.state_dtype)
            factory = self.model.step_factory()
            step = factory(self.module, cache, batch) if factory is not None else self.module.step
            self.caches[batch] = (cache, step)
        cache, step = self.caches[batch]
        for lc in cache.layers:
            for t in lc.values():
                t.zero_()
        cache.seqlen = 0
        return cache, step

    @torch.no_grad()
    def sample(self, batch: int, P: int, G: int, seed: int) -> tuple[float, float]:
        from dfplan.runtime.decode import prefill
        ids = _prompt(batch, P, self.vocab, seed, self.device)
        cache, step = self._cache(batch)
        clock = _Clock(self.device)
        t0 = clock.mark()
        logits, _ = prefill(self.module, ids, cache, self.model.prefill_chunk)   # (B, V)
        nxt = logits[:, :self.vocab].argmax(-1)
        if self.slowdown and not clock.cuda:          # CPU only: t0 is a perf_counter there
            self._spin(_perf() - t0)
        t1 = clock.mark()
        for _ in range(G):
            s = _perf() if self.slowdown else 0.0
            nxt = step(nxt, cache)[:, :self.vocab].argmax(-1)
            if self.slowdown and not clock.cuda:
                self._spin(_perf() - s)
        t2 = clock.mark()
        if not clock.cuda:          # as Model.generate does after each call (runtime/heap.py)
            from dfplan.runtime.heap import return_freed_memory
            return_freed_memory()
        return clock.seconds(t0, t1), clock.seconds(t1, t2)


class HFRunner:
    """transformers' Mamba2ForCausalLM, greedy loop over its recurrent cache."""

    def __init__(self, p: Prepared):
        import inspect

        from transformers import Mamba2ForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()     # its kernel-fallback notices would cut the progress bar
        self.model = Mamba2ForCausalLM.from_pretrained(p.path, dtype=DTYPES[p.dtype]).to(p.device).eval()
        self.device = p.device
        self.vocab = self.model.config.vocab_size
        self.model_bytes = sum(t.numel() * t.element_size() for t in self.model.parameters())
        sig = inspect.signature(self.model.forward).parameters
        self.cache_kw = "cache" if "cache" in sig else "cache_params"   # renamed in transformers 5

    @torch.no_grad()
    def sample(self, batch: int, P: int, G: int, seed: int) -> tuple[float, float]:
        ids = _prompt(batch, P, self.vocab, seed, self.device)
        clock = _Clock(self.device)
        t0 = clock.mark()
        out = self.model(ids, use_cache=True, logits_to_keep=1)
        cache = getattr(out, self.cache_kw)
        nxt = out.logits[:, -1].argmax(-1)
        t1 = clock.mark()
        for i in range(G):
            kw = {self.cache_kw: cache, "use_cache": True}
            if self.cache_kw == "cache_params":       # transformers 4.x needs the position
                kw["cache_position"] = torch.tensor([P + i], device=self.device)
            out = self.model(nxt[:, None], **kw)
            cache = getattr(out, self.cache_kw)
            nxt = out.logits[:, -1].argmax(-1)
        t2 = clock.mark()
        return clock.seconds(t0, t1), clock.seconds(t1, t2)


class LlamaCppRunner:
    """llama-cpp-python's Llama on a GGUF file: eval the prompt, then one token at a time."""

    def __init__(self, p: Prepared, ctx: int = 4096):
        llama_cpp = import_llama_cpp()
        threads = p.threads or max(1, os.cpu_count() or 1)
        self.llm = llama_cpp.Llama(model_path=p.path, n_ctx=ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, logits_all=False, verbose=False)
        self.vocab = self.llm.n_vocab()
        self.model_bytes = Path(p.path).stat().st_size

    def close(self) -> None:
        self.llm.close()        # before interpreter exit: its destructor needs the library alive

    def _argmax(self) -> int:
        ptr = self.llm._ctx.get_logits_ith(-1)
        return int(np.ctypeslib.as_array(ptr, shape=(self.vocab,)).argmax())

    def sample(self, batch: int, P: int, G: int, seed: int) -> tuple[float, float]:
        if batch != 1:
            raise DfplanError("llama-cpp-python's Llama decodes one sequence")
        ids = _prompt(1, P, self.vocab, seed, "cpu")[0].tolist()
        self.llm.reset()
        t0 = _perf()
        self.llm.eval(ids)
        nxt = self._argmax()
        t1 = _perf()
        for _ in range(G):
            self.llm.eval([nxt])
            nxt = self._argmax()
        t2 = _perf()
        return t1 - t0, t2 - t1


class MambaSsmRunner:
    """mamba-ssm's MambaLMHeadModel.generate as its benchmark script calls it (top-k 1, fp16).

    prefill = one forward over the prompt (last logits); decode = (generate time - prefill)
    / G. cg=True keeps one captured graph per batch size, as a server would."""

    def __init__(self, p: Prepared):
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

        from dfplan.loading import load_config, normalize_keys, read_state_dict
        cfg = load_config(p.path)
        d = cfg.to_mamba_ssm_dict()
        self.model = MambaLMHeadModel(MambaConfig(**d), device=p.device, dtype=DTYPES[p.dtype]).eval()
        sd = normalize_keys(read_state_dict(Path(p.path)), cfg)
        missing, unexpected = self.model.load_state_dict(sd, strict=False)
        if unexpected or any(k != "lm_head.weight" for k in missing):
            raise DfplanError(f"mamba-ssm model does not match the checkpoint: {missing[:3]} {unexpected[:3]}")
        self.cg = bool(p.options.get("cg"))
        self.device = p.device
        self.vocab = cfg.vocab_size
        self.model_bytes = sum(t.numel() * t.element_size() for t in self.model.parameters())
        self.graphs: dict[int, object] = {}

    @torch.no_grad()
    def sample(self, batch: int, P: int, G: int, seed: int) -> tuple[float, float]:
        ids = _prompt(batch, P, self.vocab, seed, self.device)
        clock = _Clock(self.device)
        t0 = clock.mark()
        self.model(ids, num_last_tokens=1).logits.argmax(-1)
        t1 = clock.mark()
        if self.cg:
            self.model._decoding_cache = self.graphs.get(batch)
        t2 = clock.mark()
        self.model.generate(input_ids=ids, max_length=P + G, cg=self.cg, return_dict_in_generate=True,
                            output_scores=True, enable_timing=False, temperature=1.0, top_k=1, top_p=1.0)
        t3 = clock.mark()
        if self.cg:
            self.graphs[batch] = getattr(self.model, "_decoding_cache", None)
        pre = clock.seconds(t0, t1)
        return pre, max(0.0, clock.seconds(t2, t3) - pre)


class LiteRunner:
    """dfplan.lite in this process (--no-isolate, tests); e2e's isolated run uses the same
    loop in a torch-free process instead (dfplan/lite/worker.py)."""

    def __init__(self, p: Prepared):
        from dfplan.lite import LiteModel
        self.model = LiteModel(p.path, state_dtype=p.options.get("state_dtype"), threads=p.threads)
        self.vocab = self.model.config.vocab_size
        self.state_dtype = self.model.state_dtype_name
        self.state_rw_bytes = state_rw_bytes(self.model.config, self.state_dtype)
        self.model_bytes = int(self.model.manifest["payload_bytes"])

    def sample(self, batch: int, P: int, G: int, seed: int) -> tuple[float, float]:
        if batch != 1:
            raise DfplanError("the lite runtime decodes one sequence")
        return self.model.time_greedy(prompt_ids(P, self.vocab, seed), G)


def prompt_ids(P: int, vocab: int, seed: int) -> list[int]:
    """The batch-1 prompt every variant gets for `seed`, as a list."""
    return _prompt(1, P, vocab, seed, "cpu")[0].tolist()


RUNNERS = {"dfplan": DfplanRunner, "hf": HFRunner, "llamacpp": LlamaCppRunner,
           "mamba_ssm": MambaSsmRunner, "lite": LiteRunner}


# libraries each runner imports: loaded before a worker's baseline RSS is read, so the peak
# over that baseline is the model and its working memory, not shared-library pages
PRELOAD = {"dfplan": ("dfplan.runtime.api", "dfplan.runtime.decode", "dfplan.kernels.cpu",
                      "dfplan.packed", "safetensors.torch"),
           "hf": ("transformers", "transformers.models.mamba2.modeling_mamba2"),
           "llamacpp": (), "mamba_ssm": ("mamba_ssm.models.mixer_seq_simple",), "lite": ("dfplan.lite",)}


def preload(p: Prepared) -> None:
    for mod in PRELOAD[p.kind]:
        importlib.import_module(mod)
    if p.kind == "llamacpp":
        import_llama_cpp()
    if p.kind == "dfplan":
        from dfplan.kernels import cpu
        cpu.available()                 # loads the compiled CPU kernels


def make_runner(p: Prepared):
    if p.threads:
        torch.set_num_threads(p.threads)
    return RUNNERS[p.kind](p)
