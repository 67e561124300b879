"""The Mamba-2 state-space scan: chunked SSD for prefill, one-token update for decode.

Notation (per head h): a_t = dt_t * A_h (A_h < 0), state S_t (P, N):
    S_t = exp(a_t) S_{t-1} + dt_t x_t B_t^T,     y_t = S_t C_t
The chunked form splits time into chunks of length l: inside a chunk the output is a masked
(l x l) "attention" C B^T weighted by decays exp(sum a); across chunks only the final states
are passed on. Any sequence length works: the tail is padded with dt = 0, which leaves the
state unchanged (decay exp(0) = 1, input dt x B = 0), so the final state is exact too.
The D skip and the gate live in the mixer, not here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def segsum(a: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = a[j+1] + ... + a[i] for i >= j, -inf above.

    Built from a masked cumsum rather than cumsum differences, which lose precision when
    the running sum is large and negative.
    """
    T = a.shape[-1]
    rep = a.unsqueeze(-1).expand(*a.shape, T)                    # (..., T, T): rep[i, j] = a[i]
    strict = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    rep = rep.masked_fill(~strict, 0)
    out = rep.cumsum(dim=-2)
    keep = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(0)
    return out.masked_fill(~keep, float("-inf"))


def ssd_chunked(x, dt, A, B, C, chunk_size: int, initial_state=None):
    """Chunked SSD scan.

    x (b, L, H, P), dt (b, L, H) already softplus'ed, A (H,) negative,
    B, C (b, L, G, N) with H % G == 0, initial_state (b, H, P, N) or None.
    Returns y (b, L, H, P) in x's dtype and final_state (b, H, P, N) in float32 (or float64).
    Computation runs in float32 at least (float64 if x is float64).
    """
    b, L, H, P = x.shape
    G, N = B.shape[-2], B.shape[-1]
    hpg = H // G
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    out_dtype = x.dtype
    x, dt, B, C = (t.to(work) for t in (x, dt, B, C))
    A = A.to(work)

    # a chunk longer than the sequence only adds padding work; the result does not depend on it
    cs = max(1, min(chunk_size, L))
    nc = -(-L // cs)
    pad = nc * cs - L
    if pad:  # dt = 0 on the padding: state passes through unchanged
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        dt = F.pad(dt, (0, 0, 0, pad))
        B = F.pad(B, (0, 0, 0, 0, 0, pad))
        C = F.pad(C, (0, 0, 0, 0, 0, pad))

    x = x.view(b, nc, cs, H, P)
    B = B.view(b, nc, cs, G, N)
    C = C.view(b, nc, cs, G, N)
    dt = dt.view(b, nc, cs, H)
    xdt = x * dt.unsqueeze(-1)                                   # (b, c, l, H, P)
    a_cum = (dt * A).cumsum(2).permute(0, 1, 3, 2).contiguous()  # (b, c, H, l)

    # 1) within each chunk: y_diag[l] = sum_{s<=l} C_l.B_s exp(a_cum[l]-a_cum[s]) xdt_s.
    # Inside one chunk the cumsum difference is accurate enough (it spans one chunk only).
    causal = torch.ones(cs, cs, dtype=torch.bool, device=x.device).tril()
    decay_in = torch.exp((a_cum.unsqueeze(-1) - a_cum.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
    CB = torch.einsum("bclgn,bcsgn->bcgls", C, B)                # (b, c, G, l, s)
    M = (decay_in.view(b, nc, G, hpg, cs, cs) * CB.unsqueeze(3)).view(b, nc, H, cs, cs)
    y = torch.einsum("bchls,bcshp->bclhp", M, xdt)               # (b, c, l, H, P)

    # 2) state at the end of each chunk from that chunk's inputs alone
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum)            # (b, c, H, l)
    xdt_dec = xdt * decay_to_end.transpose(2, 3).unsqueeze(-1)   # (b, c, l, H, P)
    states = torch.einsum("bclgn,bclgjp->bcgjpn", B, xdt_dec.view(b, nc, cs, G, hpg, P))
    states = states.reshape(b, nc, H, P, N)                      # (b, c, H, P, N)

    # 3) pass states across chunks (a scan over c + 1 points, the first being the initial state)
    if initial_state is None:
        initial_state = torch.zeros(b, H, P, N, dtype=work, device=x.device)
    states = torch.cat([initial_state.to(work).unsqueeze(1), states], dim=1)  # (b, c+1, H, P, N)
    chunk_a = F.pad(a_cum[..., -1].transpose(1, 2), (1, 0))      # (b, H, c+1)
    decay_chunk = torch.exp(segsum(chunk_a))                     # (b, H, c+1, c+1)
    states = torch.einsum("bhzc,bchpn->bzhpn", decay_chunk, states)
    prev_states, final_state = states[:, :-1], states[:, -1]     # (b, c, H, P, N), (b, H, P, N)

    # 4) contribution of the state entering each chunk: C_l . S_prev * exp(a_cum[l])
    y_off = torch.einsum("bclgn,bcgjpn->bclgjp", C, prev_states.view(b, nc, G, hpg, P, N))
    y_off = y_off.reshape(b, nc, cs, H, P) * torch.exp(a_cum).transpose(2, 3).unsqueeze(-1)
    y = (y + y_off).reshape(b, nc * cs, H, P)[:, :L]
    return y.to(out_dtype), final_state


def ssd_step(state, x, dt, A, B, C):
    """One recurrent step, state updated in place.

    state (b, H, P, N) float32; x (b, H, P); dt (b, H) softplus'ed; A (H,); B, C (b, G, N).
    Returns y (b, H, P) in float32 (without the D skip).
    """
    H, G = x.shape[1], B.shape[1]
    hpg = H // G
    x, dt, B, C = (t.to(state.dtype) for t in (x, dt, B, C))
    Bh = B.repeat_interleave(hpg, dim=1)                         # (b, H, N)
    Ch = C.repeat_interleave(hpg, dim=1)                         # (b, H, N)
    dA = torch.exp(dt * A.to(state.dtype))                       # (b, H)
    state.mul_(dA[..., None, None]).add_((dt[..., None] * x).unsqueeze(-1) * Bh.unsqueeze(2))
    return torch.einsum("bhpn,bhn->bhp", state, Ch)


def ssd_naive(x, dt, A, B, C, initial_state=None):
    """Token-by-token recurrence: the ground truth the chunked scan is tested against."""
    b, L, H, P = x.shape
    N = B.shape[-1]
    state = (torch.zeros(b, H, P, N, dtype=torch.float64, device=x.device) if initial_state is None
             else initial_state.to(torch.float64).clone())
    ys = []
    for t in range(L):
        ys.append(ssd_step(state, x[:, t].double(), dt[:, t].double(), A.double(),
                           B[:, t].double(), C[:, t].double()))
    return torch.stack(ys, dim=1), state
