"""bench decode: the bound uses the bytes a step moves and the bandwidth of the same run."""
import json

import pytest
import torch

from dfplan.cli import main


def test_decode_bench_fraction_of_same_run_bound(tiny_dir, tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / "dec.json"
    rc = main(["bench", "decode", "--model", str(tiny_dir), "--new-tokens", "6", "--prompt-len", "12",
               "--repeats", "2", "--bandwidth-mib", "16", "--state-dtype", "bf16", "--out", str(out)])
    torch.set_num_threads(threads)
    assert rc == 0
    res = json.loads(out.read_text())
    b = res["profile"]["bytes_per_step"]
    assert res["state_dtype"] == "bf16" and b["total"] == b["weights"] + b["ssm_state_rw"] + b["conv_state_rw"]
    gbs = res["bandwidth"]["read_gbs"]
    assert gbs == max(res["bandwidth"]["read_gbs_at_start"], res["bandwidth"]["read_gbs_at_end"]) > 0
    assert res["bound_tok_s"] == pytest.approx(gbs * 1e9 / b["total"])
    assert res["frac_bound_best"] == pytest.approx(res["decode_tok_s"] / res["bound_tok_s"])
    assert res["frac_bound_median"] <= res["frac_bound_best"] + 1e-12
    assert len(res["runs"]) == 2 and "bound" in capsys.readouterr().out
