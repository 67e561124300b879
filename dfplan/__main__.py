"""`python -m dfplan ...` (and `torchrun -m dfplan ...`): the same CLI as the `dfplan` script."""
import sys

from dfplan.cli import main

sys.exit(main())
