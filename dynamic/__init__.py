"""Dynamic execution: per-prompt support of structured units (SSM heads or d_inner channel
blocks, attention kv-groups, MLP hidden blocks), estimated from random sketches of their
activation energies over the prompt, then decoding with only that support.

Layering: beside planner / sensitivity (imports the core and kernels only); the benchmark
`dfplan bench dynamic` lives in bench/dynamic.py.
"""
