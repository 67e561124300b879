"""Triton kernels: interpreter cases in a fresh process (always), real-GPU checks when CUDA exists."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from dfplan.kernels import binary_linear_ref, int8_linear_ref, mamba2_step_ref  # noqa: E402
from dfplan.kernels.packing import pack_signs  # noqa: E402

CASES = Path(__file__).with_name("test_kernels_triton_cases.py")


def test_triton_cases_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "DFPLAN_TRITON_CASES": "1"}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)],
                       env=env, capture_output=True, text=True, timeout=600,
                       cwd=str(CASES.parent.parent))
    tail = (p.stdout + p.stderr)[-3000:]
    assert p.returncode == 0, tail
    assert " passed" in tail and "skipped" not in tail.split("passed")[-1], tail


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("M", [1, 3, 8, 9, 64])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_binary_triton_on_gpu(M, dtype):
    from dfplan.kernels import binary_linear
    g = torch.Generator().manual_seed(M)
    N, K, r = 515, 2051, 16
    W = torch.randn(N, K, generator=g)
    bits, rs = pack_signs(W).cuda(), W.abs().mean(1).half().cuda()
    kw = dict(u=torch.randint(-127, 128, (N, r), generator=g, dtype=torch.int8).cuda(),
              u_scale=(torch.rand(N, generator=g) * 0.01).half().cuda(),
              v=torch.randint(-127, 128, (r, K), generator=g, dtype=torch.int8).cuda(),
              v_scale=(torch.rand(r, generator=g) * 0.01).half().cuda(),
              bias=torch.randn(N, generator=g).cuda())
    x = torch.randn(M, K, generator=g).cuda().to(dtype)
    y = binary_linear(x, bits, rs, K, backend="triton", **kw)
    ref = binary_linear_ref(x.float(), bits, rs, K, **kw)
    tol = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    assert y.dtype == dtype
    assert (y.float() - ref).abs().max() <= tol * ref.abs().max()


@cuda
@pytest.mark.parametrize("M", [1, 8, 40])
def test_int8_triton_on_gpu(M):
    from dfplan.kernels import int8_linear
    g = torch.Generator().manual_seed(M)
    q = torch.randint(-128, 128, (1001, 777), generator=g, dtype=torch.int8).cuda()
    s = torch.rand(1001, generator=g).half().cuda()
    x = torch.randn(M, 777, generator=g).cuda().half()
    y = int8_linear(x, q, s, backend="triton")
    ref = int8_linear_ref(x.float(), q, s)
    assert (y.float() - ref).abs().max() <= 3e-3 * ref.abs().max()


@cuda
def test_decode_step_captures_in_a_cuda_graph():
    from dfplan.kernels.triton_step import mamba2_step_triton
    g = torch.Generator().manual_seed(0)
    Bsz, H, P, N, G, d_conv = 2, 8, 64, 128, 1, 4
    d_inner, conv_dim = H * P, H * P + 2 * G * N
    dev = "cuda"
    zx = torch.randn(Bsz, d_inner + conv_dim + H, generator=g).to(dev)
    conv = torch.randn(Bsz, conv_dim, d_conv, generator=g).to(dev)
    ssm = torch.randn(Bsz, H, P, N, generator=g).to(dev)
    params = [torch.randn(conv_dim, d_conv, generator=g).to(dev), torch.randn(conv_dim, generator=g).to(dev),
              torch.randn(H, generator=g).to(dev), torch.rand(H, generator=g).to(dev),
              torch.randn(H, generator=g).to(dev), torch.randn(d_inner, generator=g).to(dev)]
    conv_r, ssm_r = conv.clone(), ssm.clone()
    ref1 = mamba2_step_ref(zx, conv_r, ssm_r, *params, 1e-5, G, P, N)
    ref2 = mamba2_step_ref(zx, conv_r, ssm_r, *params, 1e-5, G, P, N)
    conv_w, ssm_w = conv.clone(), ssm.clone()
    mamba2_step_triton(zx, conv_w, ssm_w, *params, 1e-5, G, P, N)     # warm-up compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = mamba2_step_triton(zx, conv, ssm, *params, 1e-5, G, P, N)
    graph.replay()
    assert torch.allclose(out, ref1, atol=1e-4, rtol=1e-4)
    graph.replay()                                                       # state advanced in place
    assert torch.allclose(out, ref2, atol=1e-4, rtol=1e-4)
    assert torch.allclose(ssm, ssm_r, atol=1e-4, rtol=1e-4)
