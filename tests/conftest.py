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
