"""User-facing errors.

Anything a user can cause (bad path, bad budget, wrong model) raises DfplanError with one
line that names the problem and what to do; the CLI prints it and exits non-zero.
Programming errors stay ordinary exceptions so their tracebacks survive.
"""
import sys


class DfplanError(Exception):
    """A problem with the user's input, reported as one clear line."""


def warn(message: str) -> None:
    """Something a user should know that does not stop the run (a key ignored, a default
    assumed): one `warning: ...` line on stderr, the counterpart of the CLI's `error:` line."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
