"""`dfplan generate --runtime lite`: the torch-free library's side of the command."""
from __future__ import annotations

import time
from typing import TextIO

from ..errors import DfplanError
from ..prompting import check_tokenizer_available, peak_rss_bytes, write_text
from .model import STATE_TYPES, LiteModel, _sampling


def generate_to(out: TextIO, model_arg: str, prompt: str, *, tokenizer: str | None = None,
                max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | None = None, stop: tuple[str, ...] = (),
                state_dtype: str | None = None, stream: bool = True, eos: bool = True,
                threads: int | None = None) -> dict:
    """As dfplan.runtime.generate.generate_to, on the lite runtime (batch 1, CPU)."""
    if isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise DfplanError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    _sampling(temperature, top_k, top_p)
    if state_dtype is not None and state_dtype not in STATE_TYPES:
        raise DfplanError(f"--state-dtype must be one of {sorted(STATE_TYPES)}, got {state_dtype!r}")
    check_tokenizer_available(model_arg, tokenizer)
    t0 = time.perf_counter()
    m = LiteModel(model_arg, tokenizer=tokenizer, state_dtype=state_dtype, threads=threads)
    load_s = time.perf_counter() - t0
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              seed=seed, stop=list(stop) or None, eos=eos)
    write_text(out, m, prompt, stream, **kw)
    return {"model": model_arg, "runtime": "lite", "load_s": load_s, **m.last_stats.to_json(),
            "state_dtype": m.state_dtype_name, "state_dtype_from": m.state_dtype_origin,
            "peak_rss_bytes": peak_rss_bytes()}
