"""A packed artifact run by the torch-free library: load, then generate ids or text.

Reads the same directory `dfplan.load` reads (manifest and checksums first), into one
anonymous mapping in 2 MB pages (dfplan.hugepages.read_arena), and hands the library
pointers into it. fp16 fixed tensors (norms, conv, A_log, D, dt_bias) are widened to fp32
once, as `load_packed` does for the torch model; compressed payloads keep their bytes.

Supported: every mixer's in_proj and out_proj 1-bit (row or FBI scales, int8 low-rank
correction), row-wise symmetric IntN (2/3/4-bit codes unpacked to int8 once, as the torch
runtime does) or kept in float (fp32 / fp16 / bf16, read as stored); the tied embedding
row-wise symmetric IntN or float. That is the DF-SSM, Bi-Mamba, int4/int8 and float
layouts and any plan searched among the default candidates. Anything else (grouped or
asymmetric IntN, attention, MLP blocks, an untied head) raises a DfplanError that names it
(`--runtime torch` runs every format).
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import os
import random
import time
from pathlib import Path
from typing import Iterator

from .. import hugepages
from ..config import Mamba2Config
from ..errors import DfplanError
from ..packed_files import CONFIG, PLAN, TOKENIZER, WEIGHTS, read_manifest, verify_packed
from ..prompting import DecodeStats, Sampling, check_fits
from ..textstream import TextTracker
from ..tokenizer import check_vocab, load_tokenizer
from ..tokenizer import eos_id as tokenizer_eos_id
from . import native
from .support import config_unsupported, header_unsupported, intn_bits

STATE_TYPES = {"fp32": 0, "bf16": 1, "fp16": 2}
_ROWS, _ROW_BLOCKS = 0, 1


class LiteModel:
    """A packed 1-bit Mamba-2 artifact on the torch-free CPU library (batch 1)."""

    def __init__(self, path, *, tokenizer=None, state_dtype: str | None = None,
                 threads: int | None = None, verify: bool = True, prefill_chunk: int = 64,
                 isa: int | None = None):
        if state_dtype is not None and state_dtype not in STATE_TYPES:
            raise DfplanError(f"state dtype must be one of {sorted(STATE_TYPES)}, got {state_dtype!r}")
        d = Path(path).expanduser()
        if not d.is_dir():
            raise DfplanError(f"packed checkpoint directory {d} does not exist")
        self.manifest = verify_packed(d) if verify else read_manifest(d)
        raw = json.loads((d / CONFIG).read_text())
        self.config = cfg = Mamba2Config.from_dict(raw["dfplan_config"], name=raw.get("name", d.name))
        plan = json.loads((d / PLAN).read_text())
        why = config_unsupported(cfg)
        if why:
            raise DfplanError(f"{d}: {why}; use --runtime torch")
        self.lib = lib = native.library()
        if threads:
            lib.dfl_set_threads(int(threads))
        self.isa = int(lib.dfl_best_isa()) if isa is None else int(isa)
        planned = plan.get("state_dtype", "fp32")
        self.state_dtype_name = state_dtype or planned
        self.state_dtype_origin = "argument" if state_dtype else ("plan" if planned != "fp32" else "default")
        self.tokenizer = None
        tok_path = tokenizer if tokenizer is not None else (d / TOKENIZER if (d / TOKENIZER).exists() else None)
        if tok_path is not None:
            self.tokenizer = load_tokenizer(tok_path)
            check_vocab(self.tokenizer, cfg)
        self.path = d
        check_fits((d / WEIGHTS).stat().st_size, str(d))          # before reading anything
        self._load(d / WEIGHTS, cfg, prefill_chunk)
        self.last_stats: DecodeStats | None = None

    # -- loading ---------------------------------------------------------------------------
    def _load(self, weights: Path, cfg: Mamba2Config, chunk: int) -> None:
        _, header = hugepages.safetensors_index(weights)
        self._header = header
        why = header_unsupported(header, cfg)
        if why:
            raise DfplanError(f"{weights}: {why}; use --runtime torch")
        self._arena, self._where = hugepages.read_arena(weights, list(header), huge=hugepages.enabled())
        self._keep = []                      # fp32 copies and ctypes structs the library points into
        lib = self.lib
        f16c = bool(lib.dfl_has_f16c()) and self.isa >= 1
        blocks = self.isa >= 1 and os.environ.get("DFPLAN_ROW_BLOCKS", "1") != "0"
        self._model = lib.dfl_create(cfg.d_model, cfg.vocab_padded, self.isa, int(self.isa >= 1),
                                     STATE_TYPES[self.state_dtype_name], chunk)
        if not self._model:
            raise DfplanError(f"cannot create the lite model: {native.last_error()}")
        self._fp32 = self._widen_all(cfg)
        for i in range(cfg.n_layer):
            p = f"backbone.layers.{i}."
            lin = [self._proj(p + "mixer." + n, f16c, blocks) for n in ("in_proj", "out_proj")]
            step = native.StepWeights(
                conv_w=self._f32(p + "mixer.conv1d.weight"),
                conv_b=self._f32(p + "mixer.conv1d.bias", optional=True),
                dt_bias=self._f32(p + "mixer.dt_bias"), A_log=self._f32(p + "mixer.A_log"),
                D=self._f32(p + "mixer.D"), norm_w=self._f32(p + "mixer.norm.weight"),
                eps=cfg.norm_epsilon, H=cfg.nheads, P=cfg.headdim, N=cfg.d_state, G=cfg.ngroups,
                conv_dim=cfg.conv_dim, d_conv=cfg.d_conv,
                d_per_channel=self._numel(p + "mixer.D") == cfg.d_inner,
                norm_before_gate=bool(cfg.norm_before_gate))
            self._keep += [*lin, step]
            args = [ctypes.byref(w) if isinstance(w, kind) else None
                    for w in lin for kind in (native.BinaryWeights, native.Int8Weights, native.FloatWeights)]
            native.check(lib.dfl_add_layer(self._model, self._f32(p + "norm.weight"), cfg.norm_epsilon,
                                           *args, ctypes.byref(step)), f"layer {i}")
        if "backbone.embedding.weight" in self._header:             # a float table
            emb = self._float("backbone.embedding", cfg.vocab_padded, cfg.d_model)
            self._keep.append(emb)
            head = (None, None, ctypes.byref(emb))
        else:
            head = (self._int8_codes("backbone.embedding", cfg.vocab_padded, cfg.d_model),
                    self._f32("backbone.embedding.scale"), None)
        native.check(lib.dfl_set_head(self._model, *head, self._f32("backbone.norm_f.weight"),
                                      cfg.norm_epsilon), "head")
        self._logits = (ctypes.c_float * cfg.vocab_padded)()

    def _numel(self, name: str) -> int:
        return math.prod(self._header[name]["shape"])

    def _ptr(self, name: str):
        if name not in self._where:
            raise DfplanError(f"{self.path / WEIGHTS} has no {name}; use --runtime torch")
        return ctypes.addressof(ctypes.c_char.from_buffer(self._arena, self._where[name][1]))

    def _widen_all(self, cfg) -> dict:
        """fp32 copies of every float tensor that is not a 1-bit layer's per-row vector,
        in one more anonymous mapping; {name: address}."""
        names = [k for k, (info, _) in self._where.items()
                 if info["dtype"] in ("F16", "BF16", "F32") and not k.endswith((".row_scale", ".u_scale"))
                 and not _float_matrix(k)]
        total = sum(-(-self._numel(k) * 4 // 64) * 64 for k in names)
        self._fp32_buf = mmap.mmap(-1, max(total, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._fp32_buf))
        out, off = {}, 0
        for k in names:
            n, src = self._numel(k), self._ptr(k)
            dt = self._where[k][0]["dtype"]
            if dt == "F32":
                ctypes.memmove(base + off, src, n * 4)
            else:
                self.lib.dfl_widen16(src, base + off, n, int(dt == "BF16"))
            out[k] = base + off
            off += -(-n * 4 // 64) * 64
        return out

    def _f32(self, name: str, optional: bool = False):
        if name not in self._fp32:
            if optional and name not in self._where:
                return None
            raise DfplanError(f"{self.path / WEIGHTS}: {name} is missing or not a float tensor; "
                              "use --runtime torch")
        return self._fp32[name]

    def _rowvec(self, name: str, f16c: bool) -> native.RowVec:
        if name not in self._where:
            return native.RowVec()
        if f16c and self._where[name][0]["dtype"] == "F16":
            return native.RowVec(f16=self._ptr(name))
        if name not in self._fp32:                  # fp16 row vector on a CPU without F16C
            n, buf = self._numel(name), (ctypes.c_float * self._numel(name))()
            self.lib.dfl_widen16(self._ptr(name), buf, n, 0)
            self._keep.append(buf)
            self._fp32[name] = ctypes.addressof(buf)
        return native.RowVec(f32=self._fp32[name])

    def _int8_codes(self, prefix: str, rows: int, n: int):
        """Address of (rows, n) int8 codes of a row-wise IntN unit: its own bytes at 8 bits,
        else unpacked once into memory of their own (as the torch runtime's fast_weights)."""
        info = self._header[prefix + ".qweight"]
        bits = intn_bits(info, rows, n)
        if bits == 8:
            return self._ptr(prefix + ".qweight")
        buf = mmap.mmap(-1, max(rows * n, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._keep.append(buf)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        self.lib.dfl_unpack_intn(self._ptr(prefix + ".qweight"), rows, n, bits, addr)
        return addr

    def _float(self, prefix: str, rows: int, n: int) -> native.FloatWeights:
        """A float weight in its stored dtype (read as stored: no fp32 copy of the matrix)."""
        return native.FloatWeights(w=self._ptr(prefix + ".weight"),
                                   dtype=native.FLOAT_DTYPES[self._header[prefix + ".weight"]["dtype"]],
                                   bias=self._f32(prefix + ".bias", optional=True), out=rows, in_=n)

    def _proj(self, prefix: str, f16c: bool, blocks: bool):
        """native.BinaryWeights for a 1-bit projection, Int8Weights for an IntN one,
        FloatWeights for one the plan keeps in float."""
        cfg = self.config
        rows, n = (cfg.d_in_proj, cfg.d_model) if prefix.endswith("in_proj") else (cfg.d_model, cfg.d_inner)
        if prefix + ".weight" in self._header:
            return self._float(prefix, rows, n)
        if prefix + ".qweight" not in self._header:
            return self._binary(prefix, n, f16c, blocks)
        return native.Int8Weights(q=self._int8_codes(prefix, rows, n), scale=self._f32(prefix + ".scale"),
                                  bias=self._f32(prefix + ".bias", optional=True), out=rows, in_=n)

    def _binary(self, prefix: str, n: int, f16c: bool, blocks: bool) -> native.BinaryWeights:
        """A 1-bit projection of n inputs (support.header_unsupported checked its tensors)."""
        h = self._header
        out, nb = h[prefix + ".bits"]["shape"]
        w = native.BinaryWeights(bits=self._ptr(prefix + ".bits"), out=out, in_=n, nb=nb,
                                 layout=_ROW_BLOCKS if blocks else _ROWS)
        if prefix + ".col_scale" in h:                               # FBI scales
            w.col_scale, w.col_shift = self._f32(prefix + ".col_scale"), self._f32(prefix + ".col_shift")
        else:
            w.row_scale = self._rowvec(prefix + ".row_scale", f16c)
        if prefix + ".u" in h:                                       # int8 low-rank correction
            w.r = h[prefix + ".u"]["shape"][1]
            w.u, w.v = self._ptr(prefix + ".u"), self._ptr(prefix + ".v")
            w.u_scale = self._rowvec(prefix + ".u_scale", f16c)
            w.v_scale = self._f32(prefix + ".v_scale")
        w.bias = self._rowvec(prefix + ".bias", f16c)
        if blocks:
            self.lib.dfl_reorder_row_blocks(w.bits, out, nb)
        return w

    # -- running -----------------------------------------------------------------------------
    def reset(self) -> None:
        self.lib.dfl_reset(self._model)

    def state_bytes(self) -> int:
        return int(self.lib.dfl_state_bytes(self._model))

    def forward(self, ids) -> ctypes.Array:
        """Run `ids` (prefill, or one decode step) from the current state; the logits of the
        last token (a ctypes float array of vocab_padded entries, overwritten next call)."""
        arr = (ctypes.c_int32 * len(ids))(*ids)
        native.check(self.lib.dfl_forward(self._model, arr, len(ids), self._logits), "forward")
        return self._logits

    def logits(self, ids) -> list[float]:
        """A copy of the last token's logits after `ids`, from a zero state."""
        self.reset()
        return list(self.forward(ids))

    def eos_id(self) -> int | None:
        return None if self.tokenizer is None else tokenizer_eos_id(self.tokenizer)

    def generate_ids(self, prompt_ids, max_new_tokens: int = 32, *, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     eos: bool = True) -> Iterator[int]:
        """An iterator of the new ids, one by one (stops after max_new_tokens, or at the eos
        id); bad arguments raise here, before anything runs."""
        if isinstance(max_new_tokens, bool) or int(max_new_tokens) <= 0:
            raise DfplanError(f"max_new_tokens must be a positive integer, got {max_new_tokens}")
        ids = [int(i) for i in prompt_ids]
        if not ids:
            raise DfplanError("the prompt has no tokens; give at least one")
        V = self.config.vocab_size
        if min(ids) < 0 or max(ids) >= V:
            raise DfplanError(f"the prompt has token ids outside [0, {V})")
        Sampling(temperature, top_k, top_p)
        return self._ids(ids, int(max_new_tokens), temperature, top_k, top_p, seed,
                         self.eos_id() if eos else None)

    def _ids(self, ids, max_new_tokens, temperature, top_k, top_p, seed, eos_id) -> Iterator[int]:
        rng = random.Random(seed)
        st = self.last_stats = DecodeStats(prompt_tokens=len(ids))
        # sampled over the real vocabulary, as the torch runtime does (not the padding rows)
        lib, model, logits, V = self.lib, self._model, self._logits, self.config.vocab_size
        one = (ctypes.c_int32 * 1)()
        self.reset()
        t0 = time.perf_counter()
        self.forward(ids)
        nxt = lib.dfl_sample(logits, V, temperature, top_k, top_p, rng.random())
        st.prefill_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        for k in range(max_new_tokens):
            if nxt == eos_id:
                break
            st.new_tokens += 1
            yield nxt
            if k + 1 == max_new_tokens:
                break
            one[0] = nxt
            if lib.dfl_forward(model, one, 1, logits):
                native.check(-1, "decode step")
            st.steps += 1
            nxt = lib.dfl_sample(logits, V, temperature, top_k, top_p, rng.random())
        st.decode_s = time.perf_counter() - t1

    def time_greedy(self, prompt_ids, steps: int) -> tuple[float, float]:
        """(prefill seconds, seconds of `steps` decode steps) of one greedy generation without
        stopping at eos: what `dfplan bench e2e` samples (the torch runner times the same)."""
        for _ in self.generate_ids(prompt_ids, steps + 1, eos=False):
            pass
        return self.last_stats.prefill_s, self.last_stats.decode_s

    def generate(self, prompt_ids, max_new_tokens: int = 32, **kw) -> list[int]:
        """prompt ids -> prompt + new ids."""
        return [int(i) for i in prompt_ids] + list(self.generate_ids(prompt_ids, max_new_tokens, **kw))

    def generate_text(self, prompt, max_new_tokens: int = 64, *, stream: bool = False,
                      stop=None, **kw):
        """The new text (not the prompt); stream=True yields it piece by piece instead. A list
        of prompts gives a list of texts, generated one after another (batch 1); a seed then
        seeds each prompt alike."""
        if self.tokenizer is None:
            raise DfplanError(f"{self.path} has no tokenizer.json; pass tokenizer= (a tokenizer.json "
                              "file, a folder holding one, or a hub id)")
        if isinstance(prompt, (list, tuple)):
            if stream:
                raise DfplanError("stream=True takes one prompt, not a list")
            if not prompt:
                raise DfplanError("no prompts given")
            return [self.generate_text(p, max_new_tokens, stop=stop, **kw) for p in prompt]
        if not isinstance(prompt, str):
            raise DfplanError(f"the prompt is {type(prompt).__name__}, not a string")
        ids = self.tokenizer.encode(prompt).ids
        if not ids:
            raise DfplanError(f"the prompt ({prompt[:40]!r}) tokenizes to nothing; give at least one token of text")
        stops = tuple(stop or ())
        if any(not s for s in stops):
            raise DfplanError("a stop string must not be empty")
        gen = self._text(self.generate_ids(ids, max_new_tokens, **kw), stops)   # checks kw now
        return gen if stream else "".join(gen)

    def _text(self, new_ids: Iterator[int], stops) -> Iterator[str]:
        pieces: list[str] = []
        tracker = TextTracker(self.tokenizer, 1, stops, stream_row=0, emit=pieces.append)
        for t, nxt in enumerate(new_ids):
            done = tracker([nxt], t)
            yield from pieces
            pieces.clear()
            if done:
                break
        tracker.flush(tracker.texts[0])
        yield from pieces

    def close(self) -> None:
        if getattr(self, "_model", None):
            self.lib.dfl_destroy(self._model)
            self._model = None

    def __del__(self):
        self.close()


def load(path, **kw) -> LiteModel:
    """dfplan.lite.load(packed_dir, tokenizer=None, state_dtype=None, threads=None)."""
    return LiteModel(path, **kw)


def _float_matrix(name: str) -> bool:
    """A float weight matrix the library reads as stored (a kept projection, a float embedding)."""
    return name == "backbone.embedding.weight" or name.endswith(("in_proj.weight", "out_proj.weight"))
