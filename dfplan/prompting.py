"""What both runtimes' generate commands share, without torch: the prompt argument, the
tokenizer check that runs before any weights load, and the peak-RSS figure."""
from __future__ import annotations

import resource
import sys
from pathlib import Path

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
