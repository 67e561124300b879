"""`dfplan generate --runtime lite` (dfplan/prompting.py holds the shared body)."""
from __future__ import annotations

from typing import TextIO

from .. import prompting
from .model import LiteModel


def generate_to(out: TextIO, model_arg: str, prompt: str, *, tokenizer: str | None = None,
                state_dtype: str | None = None, threads: int | None = None, **kw) -> dict:
    """As dfplan.runtime.generate.generate_to, on the lite runtime (batch 1, CPU)."""
    res = prompting.generate_to(
        out, lambda: LiteModel(model_arg, tokenizer=tokenizer, state_dtype=state_dtype, threads=threads),
        model_arg, prompt, tokenizer=tokenizer, **kw)
    return {**res, "runtime": "lite"}
