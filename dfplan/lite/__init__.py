"""The torch-free runtime: a packed DF-SSM artifact decoded by the C++ kernels alone.

    from dfplan import lite
    m = lite.load("runs/packed-1.3b", tokenizer="20B_tokenizer.json")
    print(m.generate_text("The", max_new_tokens=20))

Same artifact, same kernels as `dfplan.load` (kernels/csrc, built a second time without
torch), batch 1 on CPU. Without torch in the process, peak memory is the weights, the
decode state and ~45 MiB of Python and tokenizer (torch alone is ~225 MiB).
`dfplan generate --runtime lite` is the command-line way in.
"""
from .model import LiteModel, load

__all__ = ["LiteModel", "load"]
