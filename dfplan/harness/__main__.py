"""`python -m dfplan.harness ARGS`: lm-eval's own command line with the `dfplan` model registered.

The stock `lm_eval` entry point imports only lm-eval's built-in models, so
`lm_eval --model dfplan` needs this module imported first; this wrapper does that and
hands every argument to lm-eval unchanged, e.g.
  python -m dfplan.harness --model dfplan --model_args pretrained=runs/x/packed --tasks piqa
Local tasks: write their YAMLs with `dfplan eval --write-tasks DIR` and add `--include_path DIR`.
"""
from lm_eval.__main__ import cli_evaluate

from . import lm  # noqa: F401  (registers the dfplan model)

if __name__ == "__main__":
    cli_evaluate()
