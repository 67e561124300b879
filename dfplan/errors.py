"""User-facing errors.

Anything a user can cause (bad path, bad budget, wrong model) raises DfplanError with one
line that names the problem and what to do; the CLI prints it and exits non-zero.
Programming errors stay ordinary exceptions so their tracebacks survive.
"""


class DfplanError(Exception):
    """A problem with the user's input, reported as one clear line."""
