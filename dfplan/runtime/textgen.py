"""Text on top of the decode loop: tokenize prompts, stream decoded text, stop strings.

The streaming rules (dfplan/textstream.py, shared with the torch-free runtime) hold text
back until it is settled, so the concatenated stream is exactly the non-streamed text.
"""
from __future__ import annotations

import queue
import threading
from typing import Iterator

import torch

from ..errors import DfplanError


def encode_prompts(tokenizer, prompts: list[str]) -> list[torch.Tensor]:
    out = []
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise DfplanError(f"prompt {i} is {type(p).__name__}, not a string")
        ids = tokenizer.encode(p).ids
        if not ids:
            raise DfplanError(f"prompt {i} ({p[:40]!r}) tokenizes to nothing; give at least one token of text")
        out.append(torch.tensor(ids, dtype=torch.int64))
    return out


def stream_in_thread(run) -> Iterator[str]:
    """Run run(emit) in a thread and yield what it emits, as it is emitted."""
    q: queue.Queue = queue.Queue()
    done = object()
    err: list = []

    def target():
        try:
            run(q.put)
        except BaseException as e:      # re-raised in the consumer
            err.append(e)
        finally:
            q.put(done)

    th = threading.Thread(target=target, daemon=True)
    th.start()
    while True:
        item = q.get()
        if item is done:
            break
        yield item
    th.join()
    if err:
        raise err[0]
