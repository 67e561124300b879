"""dfplan: plan, distill and run compressed Mamba-2 models.

    import dfplan
    m = dfplan.load("runs/demo/student")        # packed artifact, checkpoint dir, hub id, preset:NAME
    print(m.generate_text("Hello", max_new_tokens=20))

The API names are imported lazily so `import dfplan` (and the CLI) stays free of torch.
A packed DF-SSM artifact also runs without torch at all: `from dfplan import lite;
lite.load(path)` (dfplan/lite, what `dfplan generate` uses for such artifacts on CPU).
"""
__version__ = "0.1.0"

_API = ("load", "compress", "save_packed", "Model", "Sampling")


def __getattr__(name):
    if name in _API:
        from .runtime import api, sampling
        return getattr(sampling if name == "Sampling" else api, name)
    raise AttributeError(f"module 'dfplan' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_API))
