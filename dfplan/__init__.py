"""dfplan: plan, distill and run compressed Mamba-2 models."""
__version__ = "0.1.0"
