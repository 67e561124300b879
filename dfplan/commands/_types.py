"""Option types shared by the subcommands: bounded where an unbounded int would reach torch or
numpy and fail there with a traceback (torch.set_num_threads(10**40), default_rng(-1))."""
import click

THREADS = click.IntRange(1, 4096)
SEED = click.IntRange(0, 2**32 - 1)
