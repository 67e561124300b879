import os

import pytest
import torch

# Tests never reach the network; transformers' hub-kernel lookups stay local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# a dfplan.toml in the working directory (left by `dfplan demo`) must not change what tests run
os.environ["DFPLAN_PROJECT"] = "none"
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def tiny_cfg():
    from dfplan.config import Mamba2Config
    # chunk 16 so short test sequences still cross chunk boundaries
    return Mamba2Config.preset("tiny").replace(chunk_size=16)


@pytest.fixture
def tiny_model(tiny_cfg):
    from dfplan.model import build_model
    return build_model(tiny_cfg, seed=0).eval()


@pytest.fixture
def tiny_dir(tmp_path):
    """A 64-wide, 2-layer mamba_ssm checkpoint folder (safetensors) for whole-command runs."""
    from dfplan.config import Mamba2Config
    from dfplan.loading import save_mamba_ssm
    from dfplan.model import build_model
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=16, headdim=16, chunk_size=16,
                       name="t64")
    return save_mamba_ssm(build_model(cfg, seed=0).eval(), tmp_path / "t64", safetensors=True)
