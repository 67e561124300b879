"""What both runtimes' generate paths share, without torch: the prompt argument, the
tokenizer check that runs before any weights load, the timing record, writing the text
out, and the peak-RSS figure."""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .errors import DfplanError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def read_prompt(prompt: str | None, prompt_file: str | None) -> str:
    if (prompt is None) == (prompt_file is None):
        raise DfplanError("pass exactly one of --prompt TEXT or --prompt-file FILE")
    if prompt is not None:
        return prompt
    p = Path(prompt_file)
    try:
        return p.read_text()
    except FileNotFoundError:
        raise DfplanError(f"prompt file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DfplanError(f"cannot read prompt file {p}: {e}") from None


def check_tokenizer_available(model_arg: str, tokenizer: str | None) -> None:
    """A local model folder without tokenizer.json fails here, before any weights load."""
    d = Path(model_arg).expanduser()
    if tokenizer is None and (d.is_dir() or model_arg.startswith("preset:")) \
            and not (d / "tokenizer.json").exists():
        raise DfplanError(f"{model_arg} has no tokenizer.json; pass --tokenizer with a tokenizer.json "
                          "file, a folder holding one, or a hub id (e.g. --tokenizer "
                          "../shared/data/tokenizers/gpt-neox-20b/20B_tokenizer.json for state-spaces models)")


@dataclass
class DecodeStats:
    prompt_tokens: int = 0
    new_tokens: int = 0            # generated tokens over all rows
    steps: int = 0                 # recurrent steps run
    batch: int = 1
    prefill_s: float = 0.0
    decode_s: float = 0.0

    @property
    def prefill_ms(self) -> float:
        return 1000.0 * self.prefill_s

    @property
    def decode_tok_s(self) -> float:
        # tokens produced by recurrent steps (the first new token comes from the prefill)
        return self.steps * self.batch / self.decode_s if self.decode_s > 0 else float("nan")

    def to_json(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens,
                "steps": self.steps, "batch": self.batch, "prefill_ms": self.prefill_ms,
                "decode_s": self.decode_s, "decode_tok_s": self.decode_tok_s}


def write_text(out: TextIO, model, prompt: str, stream: bool, **kw) -> None:
    """model.generate_text(prompt, **kw) to `out`, piece by piece when streaming, then a newline."""
    if stream:
        for piece in model.generate_text(prompt, stream=True, **kw):
            out.write(piece)
            out.flush()
    else:
        out.write(model.generate_text(prompt, **kw))
    out.write("\n")
    out.flush()


def mem_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(need: int, what: str) -> None:
    """Refuse, before loading, a model whose weights alone exceed the free memory."""
    avail = mem_available()
    if avail is not None and need > avail:
        raise DfplanError(f"{what} needs about {need / 2**30:.1f} GiB but only {avail / 2**30:.1f} GiB "
                          "of memory is free; free memory, use a smaller model or a packed artifact")
