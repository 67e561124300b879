"""`dfplan generate` as a library function: validate everything cheap first, load, stream."""
from __future__ import annotations

import time
from typing import TextIO

from ..errors import DfplanError
from ..prompting import check_tokenizer_available, peak_rss_bytes, read_prompt, write_text  # noqa: F401
from .api import load
from .sampling import Sampling


def generate_to(out: TextIO, model_arg: str, prompt: str, *, tokenizer: str | None = None,
                max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
                top_p: float = 1.0, seed: int | None = None, stop: tuple[str, ...] = (),
                state_dtype: str | None = None, stream: bool = True, device: str | None = None,
                eos: bool = True) -> dict:
    """Write the generated text to `out` (piece by piece when streaming); returns stats.
    state_dtype None: the packed artifact plan's SSM state precision, else fp32."""
    if isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise DfplanError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    Sampling(temperature, top_k, top_p)                       # bad options fail before loading
    check_tokenizer_available(model_arg, tokenizer)
    t0 = time.perf_counter()
    m = load(model_arg, tokenizer=tokenizer, device=device, state_dtype=state_dtype)
    load_s = time.perf_counter() - t0
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              seed=seed, stop=list(stop) or None, eos=eos)
    write_text(out, m, prompt, stream, **kw)
    st = m.last_stats
    return {"model": model_arg, "load_s": load_s, **st.to_json(), "state_dtype": m.state_dtype_name,
            "state_dtype_from": m.state_dtype_origin,
            "peak_rss_bytes": peak_rss_bytes()}
