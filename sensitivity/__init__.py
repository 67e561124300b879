"""KL sensitivity analysis: how much each unit x format moves the teacher's next-token
distribution, computed forward-only from a cached teacher pass, plus its validation
against true held-out perplexity. See analyzer.py for the method, table.py for the files."""
from .analyzer import SensitivityResult, compressed, evaluate_job, run_local
from .jobs import AnalyzerConfig, parse_candidates
from .metrics import DAMAGE_SIGN, METRICS

__all__ = ["AnalyzerConfig", "DAMAGE_SIGN", "METRICS", "SensitivityResult", "compressed", "evaluate_job",
           "parse_candidates", "run_local"]
