"""`dfplan generate` on the torch runtime (dfplan/prompting.py holds the shared body)."""
from __future__ import annotations

from typing import TextIO

from .. import prompting
from .api import load


def generate_to(out: TextIO, model_arg: str, prompt: str, *, tokenizer: str | None = None,
                state_dtype: str | None = None, device: str | None = None, **kw) -> dict:
    """Write the generated text to `out` (piece by piece when streaming); returns stats.
    state_dtype None: the packed artifact plan's SSM state precision, else fp32. kw: the
    sampling, stop, stream and eos options of prompting.generate_to."""
    res = prompting.generate_to(
        out, lambda: load(model_arg, tokenizer=tokenizer, device=device, state_dtype=state_dtype),
        model_arg, prompt, tokenizer=tokenizer, **kw)
    return {**res, "runtime": "torch"}
