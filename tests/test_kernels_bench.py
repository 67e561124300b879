"""`dfplan bench kernels` end to end on tiny shapes (structure and arithmetic, not speed)."""
import json

import pytest
import torch

from dfplan.cli import main
from dfplan.kernels import cpu


def test_bench_kernels_writes_consistent_json(tmp_path):
    if not cpu.available():
        pytest.skip(f"CPU kernels unavailable: {cpu.build_error()}")
    threads = torch.get_num_threads()
    rc = main(["bench", "kernels", "--out", str(tmp_path), "--model", "tiny", "--units",
               "in_proj,lm_head", "--impls", "bin,int8,fp32", "--batch", "1,3", "--budget", "0.01", "--bandwidth-mib", "64",
               "--threads", "1"])
    torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads((tmp_path / "kernels.json").read_text())
    assert res["metadata"]["git"]["commit"] and res["bandwidth"]["read_gbs"] > 0
    rows = res["rows"]
    # bin is skipped for the lm_head (embedding formats only); everything else per batch
    assert {(r["unit"], r["impl"], r["batch"]) for r in rows} == {
        (u, i, b) for u in ("in_proj", "lm_head") for i in ("bin", "int8", "fp32") for b in (1, 3)
        if not (u == "lm_head" and i == "bin")}
    for r in rows:
        assert r["median_ms"] > 0 and r["weight_copies"] >= 2
        assert r["gbs"] == pytest.approx(r["weight_bytes"] / r["median_ms"] / 1e6)
        assert r["x_bound"] == pytest.approx(r["median_ms"] / r["bound_ms"])
    binrow = next(r for r in rows if r["impl"] == "bin")
    assert binrow["weight_bytes"] == binrow["out"] * ((binrow["in"] + 7) // 8) + 2 * binrow["out"]
    assert "cpu_bin_in_proj_gemv_within_2x_of_bound" in res["checks"]


def test_bench_kernels_rejects_bad_arguments(tmp_path):
    assert main(["bench", "kernels", "--out", str(tmp_path), "--units", "nope"]) == 2
    assert main(["bench", "kernels", "--out", str(tmp_path), "--batch", "0"]) == 2
    assert main(["bench", "kernels", "--out", str(tmp_path), "--impls", "fp64"]) == 2
