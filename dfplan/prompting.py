"""What both runtimes' generate paths share, without torch: the prompt argument, the
sampling options, the tokenizer check that runs before any weights load, the timing
record, `generate_to` (the command's body), and the memory figures."""
from __future__ import annotations

import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TextIO

from .errors import DfplanError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports ru_maxrss in KiB)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def proc_status_bytes(key: str) -> int | None:
    """A size from /proc/self/status (VmRSS, VmHWM, ...) in bytes; None off Linux. VmHWM is
    this address space's own peak: getrusage's ru_maxrss carries over fork + exec, so a
    spawned worker would report its parent's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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


@dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (argmax); top_k 0 and top_p 1 switch those filters off."""
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0.0):                     # also refuses NaN
            raise DfplanError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise DfplanError(f"top_k must be a non-negative integer (0 = off), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise DfplanError(f"top_p must lie in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def generate_to(out: TextIO, load: Callable[[], object], model_arg: str, prompt: str, *,
                tokenizer: str | None = None, max_new_tokens: int = 64, temperature: float = 0.0,
                top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                stop: tuple[str, ...] = (), stream: bool = True, eos: bool = True) -> dict:
    """`dfplan generate` for either runtime: check everything cheap, then load() the model
    (dfplan.load or dfplan.lite.load), write its text to `out` (piece by piece when
    streaming) and return the stats."""
    if isinstance(max_new_tokens, bool) or max_new_tokens <= 0:
        raise DfplanError(f"--max-new-tokens must be a positive integer, got {max_new_tokens}")
    Sampling(temperature, top_k, top_p)                       # bad options fail before loading
    check_tokenizer_available(model_arg, tokenizer)
    t0 = time.perf_counter()
    m = load()
    load_s = time.perf_counter() - t0
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              seed=seed, stop=list(stop) or None, eos=eos)
    if stream:
        for piece in m.generate_text(prompt, stream=True, **kw):
            out.write(piece)
            out.flush()
    else:
        out.write(m.generate_text(prompt, **kw))
    out.write("\n")
    out.flush()
    return {"model": model_arg, "load_s": load_s, **m.last_stats.to_json(),
            "state_dtype": m.state_dtype_name, "state_dtype_from": m.state_dtype_origin,
            "peak_rss_bytes": peak_rss_bytes()}


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
