"""The `dfplan` model for lm-eval: scores with the model's parallel forward, generates with
its recurrent step, so any FP checkpoint, plan student or packed artifact is evaluated by
lm-eval's own task code.

lm-eval finds models through its registry; importing this module registers `dfplan`.
The stock `lm_eval` command does not import third-party modules, so run it as
`python -m dfplan.harness --model dfplan --model_args pretrained=PATH --tasks ...`
(same arguments as `lm_eval`), or `dfplan eval --tasks ...`.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from ..errors import DfplanError
from ..runtime import load
from ..tokenizer import check_vocab, eos_id, load_tokenizer
from .artifact import trained_context

log = logging.getLogger(__name__)
DEFAULT_MAX_LENGTH = 2048


def _int(v, name: str) -> int | None:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        raise DfplanError(f"{name} must be an integer, got {v!r}") from None


def _dtype(v):
    if v in (None, "", "auto"):
        return None
    if isinstance(v, torch.dtype):
        return v
    d = getattr(torch, str(v).removeprefix("torch."), None)
    if not isinstance(d, torch.dtype):
        raise DfplanError(f"unknown dtype {v!r} (float32, bfloat16, float16)")
    return d


@register_model("dfplan")
class DfplanLM(TemplateLM):
    """model_args: pretrained=PATH (checkpoint dir, packed artifact dir or hub id),
    tokenizer=tokenizer.json (default: the model's own), batch_size, max_length (default:
    the trained context when known, else 2048), stride (rolling perplexity: new tokens per
    window; default max_length, i.e. disjoint windows as lm-eval's HF model does),
    dtype, device, max_gen_toks."""

    def __init__(self, pretrained: str | None = None, tokenizer=None, batch_size=8, max_length=None,
                 stride=None, dtype=None, device=None, max_gen_toks=256, model=None, **_ignored):
        super().__init__()
        if _ignored:
            log.warning("dfplan model ignores arguments %s", sorted(_ignored))
        if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("CUDA is not available; the dfplan model runs on the CPU")   # lm_eval's CLI default
            device = "cpu"
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            batch_size = 8
        if model is None:
            if not pretrained:
                raise DfplanError("the dfplan model needs pretrained=PATH")
            loaded = load(str(pretrained), dtype=_dtype(dtype), device=device,
                          tokenizer=tokenizer if isinstance(tokenizer, str) and tokenizer else None)
            model, tok = loaded.module, loaded.tokenizer
            if tok is None:
                raise DfplanError(f"{pretrained} has no tokenizer.json; pass a tokenizer "
                                  "(model_args tokenizer=PATH or --tokenizer)")
            tokenizer = tok
        elif tokenizer is None or isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer) if tokenizer else None
            if tokenizer is None:
                raise DfplanError("a model object needs its tokenizer")
        self.model, self.tokenizer = model.eval(), tokenizer
        check_vocab(tokenizer, model.config)
        self.vocab_size = model.config.vocab_size
        eos = eos_id(tokenizer)
        if eos is None:
            raise DfplanError("the tokenizer has no end-of-text token (<|endoftext|>, </s> or <eos>); "
                              "lm-eval needs one to condition empty contexts and perplexity windows")
        self._eot = eos
        self.pretrained = str(pretrained) if pretrained else getattr(model.config, "name", "model")
        trained = trained_context(self.pretrained) if pretrained else None
        self.trained_context = trained
        ml = _int(max_length, "max_length")
        if ml is not None and ml < 2:
            raise DfplanError(f"max_length must be >= 2, got {ml}")
        if ml is not None and trained is not None and ml > trained:
            raise DfplanError(f"context length {ml} is above the model's: {self.pretrained} was trained "
                              f"on {trained}-token sequences; use max_length <= {trained}")
        self._max_length = ml or trained or DEFAULT_MAX_LENGTH
        st = _int(stride, "stride")
        self.stride = self._max_length if st is None else st
        if not 1 <= self.stride <= self._max_length:
            raise DfplanError(f"stride must be in 1..{self._max_length}, got {self.stride}")
        self._batch_size = _int(batch_size, "batch_size") or 8
        self.max_gen_toks = _int(max_gen_toks, "max_gen_toks") or 256
        p = next(iter(model.parameters()), None)
        p = next(iter(model.buffers()), None) if p is None else p
        self._device = p.device if p is not None else torch.device("cpu")

    # --- what lm-eval reads ----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return f"dfplan:{self.pretrained}"

    def get_model_info(self) -> dict:
        return {"dfplan_model": self.pretrained, "max_length": self._max_length, "stride": self.stride}

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids))

    # --- scoring ---------------------------------------------------------------------
    @torch.no_grad()
    def _logprobs(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (b, L) -> log-probabilities (b, L, vocab) over the real vocabulary."""
        logits = self.model(ids.to(self._device)).float()[..., :self.vocab_size]
        return F.log_softmax(logits, dim=-1)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """requests: ((context, continuation) | None, context_ids, continuation_ids).
        Inputs longer than max_length keep their last max_length tokens (as lm-eval's HF model)."""
        out: list = [None] * len(requests)
        prepared = []
        for i, (key, ctx, cont) in enumerate(requests):
            if not cont:
                raise DfplanError(f"empty continuation in request {key!r}")
            whole = (list(ctx) + list(cont))[-(self._max_length + 1):]
            prepared.append((i, whole[:-1], list(cont)[-len(whole) + 1:] if len(cont) >= len(whole) else list(cont)))
        prepared.sort(key=lambda r: -len(r[1]))          # long first: similar lengths share a batch
        bar = tqdm(total=len(prepared), disable=disable_tqdm, desc="loglikelihood", unit="req")
        for b in range(0, len(prepared), self._batch_size):
            chunk = prepared[b:b + self._batch_size]
            L = len(chunk[0][1])
            ids = torch.zeros(len(chunk), L, dtype=torch.long)   # right padding: causal, so harmless
            for r, (_, inp, _) in enumerate(chunk):
                ids[r, :len(inp)] = torch.tensor(inp)
            logp = self._logprobs(ids)                            # (b, L, V)
            for r, (i, inp, cont) in enumerate(chunk):
                n, k = len(inp), len(cont)
                lp = logp[r, n - k:n]                             # (k, V) predicts cont
                tgt = torch.tensor(cont, device=lp.device)
                ll = lp.gather(-1, tgt[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == tgt).all())
                out[i] = (ll, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
            bar.update(len(chunk))
        bar.close()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood: windows of max_length tokens, each scoring `stride`
        new tokens after the first (lm-eval's get_rolling_token_windows)."""
        context_len = self._max_length - self.stride + 1
        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="loglikelihood_rolling", unit="doc"):
            (string,) = req.args
            wins = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(string), self.prefix_token_id, self._max_length, context_len)]
            lls = self._loglikelihood_tokens([(None, c, t) for c, t in wins], disable_tqdm=True)
            total = sum(ll for ll, _ in lls)
            results.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", (string,), total)
        return results

    # --- generation through the recurrent step ---------------------------------------
    @torch.no_grad()
    def _greedy(self, ids: list[int], max_new: int, until: list[str]) -> str:
        """Prefill with the forward, then one recurrent step per token; greedy."""
        x = torch.tensor([ids], dtype=torch.long, device=self._device)
        logits, cache = self.model(x, return_cache=True)
        nxt = logits[0, -1, :self.vocab_size].argmax()
        new: list[int] = []
        for _ in range(max_new):
            t = int(nxt)
            if t == self._eot:
                break
            new.append(t)
            text = self.tok_decode(new)
            if any(u and u in text for u in until):
                break
            nxt = self.model.step(torch.tensor([t], device=self._device), cache)[0, :self.vocab_size].argmax()
        text = self.tok_decode(new)
        for u in until:
            if u:
                text = text.split(u)[0]
        return text

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until", unit="req"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            if kw.pop("do_sample", False) and float(kw.get("temperature", 1.0) or 0) > 0:
                log.warning("dfplan model decodes greedily; do_sample is ignored")
            ids = self.tok_encode(context) or [self.prefix_token_id]
            ids = ids[-max(1, self._max_length - max_new):]
            text = self._greedy(ids, max_new, until)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
