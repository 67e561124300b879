"""The kernels' own error type: kernels/ is the bottom layer and imports nothing above it.

Raised for bad arguments a caller can cause (wrong dtype or shape, an unknown or unusable
DFPLAN_KERNELS backend). The CLI reports it as one `error:` line like dfplan's DfplanError.
"""


class KernelError(ValueError):
    """Bad kernel arguments or an unusable backend request, reported as one clear line."""
