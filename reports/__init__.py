"""Reports: a run directory rendered as markdown with PNG figures (`dfplan report`).

run.py          the run directory: artifacts read once, each use recorded, clear errors
identity.py     which model the run is about; refuses artifacts of two models
render.py       assembles the sections, writes figures and report.md all or nothing
plans.py        the run's plans side by side
sensitivity.py  unit x format KL heatmap (log), the table, its validation
pareto.py       bytes vs predicted / measured KL, uniform and chosen plans marked
allocation.py   bits per weight and correction rank by depth
size.py         where the bytes go
study.py        Optuna's own plots of the search study
curves.py       teacher training and distillation curves
evaluation.py   teacher vs students with chance levels
bench.py        latency / throughput vs baselines with the bandwidth bound
environment.py  code and library versions behind each artifact
check.py        does a report name every artifact its run produced (CI)
"""
from .render import Report, render_report

__all__ = ["Report", "render_report"]
