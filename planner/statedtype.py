"""The SSM state precision axis of a plan: fp32, bf16 or fp16 while decoding.

The state is read and written whole every decoded token (Mamba-2 1.3B: 100 MB in fp32, about
40% of a packed model's traffic per token), so halving it speeds decoding; what it costs in
quality is measured, not assumed: the teacher generates greedily with the fp32 state, the
same tokens are fed with the state kept in bf16 and in fp16, and the mean per-position
KL(p_fp32 || p_low) decides (dfplan/runtime/statekl.py). `auto` picks the cheapest precision
(fewest state bytes; on a tie the lower KL) whose mean KL is at most `kl_max`, else fp32.

The state does not change a single weight byte, so this is decided beside the bit-width
search and never touches the budget.
"""
from __future__ import annotations

import math

import torch

from dfplan.data import heldout_windows, load_tokens
from dfplan.errors import DfplanError
from dfplan.formats.plan import STATE_DTYPES
from dfplan.loading import load_model
from dfplan.runtime.decode import state_bytes
from dfplan.runtime.statekl import state_dtypes_kl
from dfplan.tokenizer import check_vocab, load_tokenizer

CHOICES = STATE_DTYPES + ("auto",)
DEFAULT_KL_MAX = 1e-3       # nats/token, mean over the generation; bf16 on the tiny teacher: 2.8e-4


def check_state_options(state_dtype: str, kl_max: float, tokens: int, prompt_len: int) -> None:
    if state_dtype not in CHOICES:
        raise DfplanError(f"--state-dtype {state_dtype!r} is not one of {', '.join(CHOICES)}")
    if not (isinstance(kl_max, (int, float)) and math.isfinite(kl_max) and kl_max >= 0):
        raise DfplanError(f"--state-kl-max must be a finite number >= 0, got {kl_max!r}")
    if tokens < 2 or prompt_len < 1:
        raise DfplanError(f"--state-tokens must be >= 2 and the prompt >= 1 token, got {tokens} / {prompt_len}")


def bytes_table(cfg) -> dict:
    """dtype -> SSM state bytes read + written per decoded token at batch 1."""
    return {d: state_bytes(cfg, d)["ssm_state_rw"] for d in STATE_DTYPES}


def _prompt(model_arg: str, model, tok, corpus, tokenizer, prompt_len: int, seed: int, say):
    """(1, prompt_len) ids: held-out text of the corpus when there is one, else seeded random ids."""
    if corpus:
        if tokenizer:
            tok = load_tokenizer(tokenizer)
        if tok is None:
            raise DfplanError(f"{model_arg} has no tokenizer.json; pass --tokenizer to measure the state "
                              "precision on --corpus text")
        check_vocab(tok, model.config)
        stream = load_tokens(list(corpus), tok)
        ids = heldout_windows(stream.tokens, prompt_len, 1, seed)[0, :prompt_len]
        return torch.as_tensor(ids, dtype=torch.int64)[None], {"corpus": [str(f) for f in stream.files]}
    say(f"state precision: no --corpus, so the prompt is {prompt_len} seeded random token ids")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=g), {"corpus": None}


def choose_state_dtype(cfg, state_dtype: str, *, model_arg: str, random_init: bool = False,
                       corpus=(), tokenizer: str | None = None, kl_max: float = DEFAULT_KL_MAX,
                       tokens: int = 512, prompt_len: int = 64, seed: int = 0, progress: bool = False,
                       say=print) -> dict:
    """-> {"state_dtype", "state_kl", "state_bytes_per_token", "provenance"} for the plan.

    A fixed precision is recorded with its bytes (fp32's KL is 0 by definition, the others
    unmeasured); `auto` loads the model and measures bf16 and fp16."""
    check_state_options(state_dtype, kl_max, tokens, prompt_len)
    table = bytes_table(cfg)
    if state_dtype != "auto":
        return {"state_dtype": state_dtype, "state_kl": 0.0 if state_dtype == "fp32" else None,
                "state_bytes_per_token": table[state_dtype],
                "provenance": {"requested": state_dtype, "bytes_per_token": table}}
    model, tok = load_model(model_arg, random_init=random_init, dtype=torch.float32, seed=seed)
    model = model.eval()
    prompt, src = _prompt(model_arg, model, tok, corpus, tokenizer, prompt_len, seed, say)
    say(f"state precision: measuring KL of bf16 / fp16 against the fp32 state over {tokens} generated "
        f"tokens after a {prompt.shape[1]}-token prompt")
    kls = state_dtypes_kl(model, prompt, tokens, ("bf16", "fp16"), progress=progress)
    del model
    ok = [d for d in ("bf16", "fp16") if kls[d]["kl_mean"] <= kl_max]
    chosen = min(ok, key=lambda d: (table[d], kls[d]["kl_mean"])) if ok else "fp32"
    for d in ("bf16", "fp16"):
        say(f"state {d}: mean KL {kls[d]['kl_mean']:.3g} (max {kls[d]['kl_max']:.3g}, top-1 agreement "
            f"{kls[d]['top1_agree']:.1%}), {table[d]:,} bytes/token"
            + ("" if d in ok else f": above --state-kl-max {kl_max:g}"))
    say(f"state precision: {chosen} ({table[chosen]:,} bytes/token, fp32 {table['fp32']:,})")
    return {"state_dtype": chosen, "state_kl": 0.0 if chosen == "fp32" else kls[chosen]["kl_mean"],
            "state_bytes_per_token": table[chosen],
            "provenance": {"requested": "auto", "kl_max": kl_max, "tokens": tokens,
                           "prompt_tokens": int(prompt.shape[1]), "prompt": src["corpus"] or "random ids",
                           "seed": seed, "random_init": random_init, "kl": kls, "bytes_per_token": table}}
