"""Dynamic execution: per-prompt support of structured units (SSM heads or d_inner channel
blocks, attention kv-groups, MLP hidden blocks), estimated from random sketches of their
activation energies over the prompt, then decoding with only that support.

Layering: dfplan.dynamic sits beside dfplan.bench (it imports core, formats, kernels and
dfplan.bench.common for timing); nothing below it imports it.
"""
