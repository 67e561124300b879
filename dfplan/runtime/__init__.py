"""Running a model: load, generate (ids or text, streamed), compress, save packed."""
from .api import Model, compress, load, resolve_plan, save_packed
from .decode import STATE_DTYPES, DecodeStats
from .sampling import Sampling

__all__ = ["Model", "load", "compress", "save_packed", "resolve_plan", "Sampling", "DecodeStats",
           "STATE_DTYPES"]
