"""Choose a format per layer under a byte budget.

budget.py     parse "300MB" / "278MiB" / plain bytes
space.py      candidates per unit with exact bytes (+ fixed tensors): the search space
surrogate.py  predicted KL = sum of per-unit KL from the sensitivity table, fitted correction
prior.py      size-only pseudo-KL for models without a sensitivity table (no quality claim)
milp.py       exact optimum (multiple-choice knapsack, HiGHS) and the Pareto front
optuna_search.py  TPE / NSGA-II studies with a budget constraint, resumable storage
measured.py   true KL of a plan on held-out windows (--objective measured, --validate)
uniform.py    uniform allocations, the baselines
plan.py       the Plan schema (plan.json)
run.py        `dfplan search` as a library call; summary.py writes plan.md / pareto.csv
benchmark.py  KL-guided vs uniform at equal bytes, Optuna vs MILP, wall times
"""
