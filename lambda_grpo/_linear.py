"""The loss from hidden states and the LM head (fused linear): logits never exist in full.

A leaf computation module (the custom ops in lambda_grpo/_ops.py call it), engine-agnostic: the
vocabulary passes of each chunk are the engine's (`_vocab_torch` or `_vocab_triton`), the matmuls
are torch's (cuBLAS on CUDA). The valid tokens are gathered once (one host read of the mask) and
walked in chunks of `chunk_rows(V, H)` tokens:

    logits_c = h_c @ W^T (+ b)                (the hidden dtype, fp32 accumulation)
    fused schedule (no ratio-mode trace):     dlogits_c written over logits_c by the engine
    two-pass schedule (ratio-mode trace):     pass 1 logp, H, lse per chunk; the row pass over
                                              the whole batch; pass 2 recomputes logits_c and
                                              writes dlogits_c from the row coefficients
    dh_c = dlogits_c @ W,   dW += dlogits_c^T @ h_c (fp32),   db += sum_c dlogits_c (fp32)

Everything is computed in the forward for an upstream gradient of 1 (as Liger's chunked losses
do); the backward multiplies the three gradients by g. Peak extra memory: dhidden + dW (+ db) +
one chunk of logits and its fp32 scratch. The two-pass schedule does one more logits matmul.
A frozen LM head (neither weight nor bias requires a gradient: a trainer that trains only the
top layers, LoRA) gets no dW / db at all: no (V, H) buffer and no dW matmul.

VJP per chunk (x = logits / tau, p = softmax(x)): dL/dlogits_c as in the vocab engines; then the
matmul's VJP: dL/dh = dL/dlogits W, dL/dW = dL/dlogits^T h, dL/db = sum over tokens.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .config import LossConfig
from ._batch import Batch, compute_dtype
from ._rowmath import FusedInputs, fused_inputs, broadcast_rows, token_constants

# Tokens per chunk: the chunk's logits hold about this many elements (CPU: 2^22 = 16 MiB in fp32,
# a few times a core's cache, enough for the matmul to run near its peak; CUDA: 2^28 = 512 MiB in
# bf16, enough to fill an H100/H200 and small next to dW at real vocabularies).
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 28}


# Rows per chunk at least min(H, MIN_ROWS). Every chunk repacks W for the logits and the dhidden
# GEMMs and reads and writes dW once: about 16·V·H bytes and a fixed share of GEMM setup against
# 6·rows·V·H flops. Measured on this project's 2-core CPU (fp32, valid tokens of N = 2 048, the
# three matmuls alone, min of interleaved repeats): 256-row chunks took 1.23x (V = 49 152,
# H = 576) and 1.31x (V = 151 936, H = 896) the one-shot matmuls, 448-896 rows 0.83-1.06x
# (within the noise of a loaded machine), 512 rows 1.06x at H = 576. 512 keeps the chunk below
# dW's size (rows < H) at H >= 576, so the peak stays under that of a second dW buffer.
MIN_ROWS = 512


def chunk_rows(V: int, H: int, device: torch.device) -> int:
    """Tokens per chunk for a vocabulary of V and hidden size H: CHUNK_ELEMENTS // V, and at least
    min(H, MIN_ROWS) (H bounds it from below: a chunk narrower than the hidden size would make
    the dW matmul skinny; MIN_ROWS amortises the per-chunk cost of repacking W)."""
    elems = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(1, min(elems // max(V, 1), 1 << 16), min(H, MIN_ROWS))


class LinearGrads(NamedTuple):
    dhidden: torch.Tensor  # (B, T, H) hidden dtype, for an upstream gradient of 1
    dweight: Optional[torch.Tensor]  # (V, H) weight dtype, or None (head_grad=False)
    dbias: Optional[torch.Tensor]  # (V,) bias dtype, or None (no bias, or head_grad=False)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            buf: Optional[torch.Tensor] = None) -> torch.Tensor:
    """h @ W^T (+ b), into buf[:rows] when given: one chunk buffer for the whole walk, so its pages
    are mapped once instead of once per chunk (a chunk is far above glibc's mmap threshold, so a new
    tensor per chunk is a new mapping, page-faulted row by row)."""
    if buf is None:
        x = h @ weight.T
    else:
        x = torch.mm(h, weight.T, out=buf[: h.shape[0]])
    return x if bias is None else x.add_(bias)


def _chunk_buffer(step: int, n: int, V: int, like: torch.Tensor) -> torch.Tensor:
    return torch.empty((min(step, n), V), dtype=like.dtype, device=like.device)


def _take(x: Optional[torch.Tensor], idx: torch.Tensor) -> Optional[torch.Tensor]:
    """Entries idx of the flat row layout of x ((B, T) or (B*T,))."""
    return None if x is None else x.reshape(-1).index_select(0, idx)


def linear_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], batch: Batch,
                   cfg: LossConfig, eng, need_grad: bool, per_token: bool, head_grad: bool = True):
    """(RowPass, LinearGrads or None) of the loss from hidden states; see the module docstring.
    head_grad=False (a frozen LM head): dweight and dbias are neither allocated nor computed
    (None), which saves the (V, H) fp32 buffer and one matmul per chunk.

    The hidden rows are in the Batch's vocabulary layout (lambda_grpo/_batch.py): (B*T, H), or
    (N, H) packed; valid token `idx[j]` of the hidden rows is `dst[j]` of the row layout (the same
    as idx when not packed)."""
    Hd = hidden.shape[-1]
    B, T = batch.advantages.shape
    V = weight.shape[0]
    dev = hidden.device
    dtype = compute_dtype(hidden.dtype)
    tau = float(cfg.temperature)
    h2 = hidden.reshape(-1, Hd)
    idx = batch.vocab_mask.reshape(-1).nonzero().squeeze(1)  # valid tokens: one host read (skips padding's matmuls)
    n = int(idx.numel())
    tokens = batch.vocab_tokens.reshape(-1).index_select(0, idx)
    pos = batch.packed_pos
    dst = idx if pos is None else pos.index_select(0, idx)
    consts = token_constants(batch, cfg, dtype, eng.group_weights)
    ones = torch.ones(n, dtype=torch.bool, device=dev)
    logp = torch.zeros(B * T, dtype=dtype, device=dev)
    ent = torch.zeros(B * T, dtype=dtype, device=dev) if cfg.needs_entropy else None
    step = chunk_rows(V, Hd, dev)
    fused = need_grad and not cfg.row_coupled
    grads = None
    if need_grad:
        dh = torch.zeros(h2.shape[0], Hd, dtype=hidden.dtype, device=dev)
        wdt = torch.float32 if weight.dtype != torch.float64 else torch.float64
        dW = torch.zeros(V, Hd, dtype=wdt, device=dev) if head_grad else None
        db = None if bias is None or not head_grad else torch.zeros(V, dtype=wdt, device=dev)

    def backprop(s, e, hc, dl):
        dh.index_copy_(0, idx[s:e], (dl @ weight).to(hidden.dtype))
        if dW is not None:
            dW.addmm_(dl.T.to(dW.dtype), hc.to(dW.dtype))
        if db is not None:
            db.add_(dl.sum(0, dtype=db.dtype))

    buf = _chunk_buffer(step, n, V, hidden) if n else None
    if fused:
        fin = fused_inputs(consts, batch, dtype)
        fin = FusedInputs(*(None if v is None else _take(broadcast_rows(v, fin.A), dst) for v in fin))
        for s in range(0, n, step):
            e = min(s + step, n)
            hc = h2.index_select(0, idx[s:e])
            xc = _logits(hc, weight, bias, buf)
            chunk_in = FusedInputs(*(None if v is None else v[s:e] for v in fin))
            lp, H, dl = eng.vocab_fused(xc, tokens[s:e], ones[: e - s], tau, cfg.needs_entropy, chunk_in, cfg, out=xc)
            logp.index_copy_(0, dst[s:e], lp.to(dtype))
            if ent is not None:
                ent.index_copy_(0, dst[s:e], H.to(dtype))
            backprop(s, e, hc, dl)
        rp = eng.row_pass(logp.view(B, T), None if ent is None else ent.view(B, T), batch, cfg, consts,
                          per_token=per_token, want_coef=False)
    else:
        lse = torch.zeros(2, n, dtype=dtype, device=dev)  # [max, log sum] per token (vocab_forward)
        for s in range(0, n, step):
            e = min(s + step, n)
            xc = _logits(h2.index_select(0, idx[s:e]), weight, bias, buf)
            lp, H, ls = eng.vocab_forward(xc, tokens[s:e], ones[: e - s], tau, cfg.needs_entropy, want_lse=need_grad)
            logp.index_copy_(0, dst[s:e], lp.to(dtype))
            if ent is not None:
                ent.index_copy_(0, dst[s:e], H.to(dtype))
            if need_grad:
                lse[:, s:e] = ls.to(dtype)
            del xc
        rp = eng.row_pass(logp.view(B, T), None if ent is None else ent.view(B, T), batch, cfg, consts,
                          per_token=per_token, want_coef=need_grad)
        if need_grad:
            gl = rp.dlogp.reshape(-1).to(dtype).index_select(0, dst)
            gh = None if rp.dentropy is None else rp.dentropy.reshape(-1).to(dtype).index_select(0, dst)
            Hv = None if gh is None else ent.index_select(0, dst)
            one = torch.ones((), dtype=dtype, device=dev)
            for s in range(0, n, step):
                e = min(s + step, n)
                hc = h2.index_select(0, idx[s:e])
                xc = _logits(hc, weight, bias, buf)
                dl = eng.vocab_backward(xc, tokens[s:e], ones[: e - s], lse[:, s:e], gl[s:e],
                                        None if gh is None else gh[s:e], None if Hv is None else Hv[s:e], tau, one,
                                        out=xc)
                backprop(s, e, hc, dl)
    if need_grad:
        grads = LinearGrads(dh.view(hidden.shape), None if dW is None else dW.to(weight.dtype),
                            None if db is None else db.to(bias.dtype))
    return rp, grads


def linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], tokens: torch.Tensor,
                    tau: float, want_entropy: bool, eng):
    """Per-token logp, entropy (or None) and lse, (B, T) in the compute dtype, chunk by chunk."""
    B, T, Hd = hidden.shape
    V = weight.shape[0]
    N = B * T
    h2 = hidden.reshape(N, Hd)
    toks = tokens.reshape(-1)
    ones = torch.ones(N, dtype=torch.bool, device=hidden.device)
    parts = []
    step = chunk_rows(V, Hd, hidden.device)
    buf = _chunk_buffer(step, N, V, hidden) if N else None
    for s in range(0, N, step):
        e = min(s + step, N)
        parts.append(eng.vocab_forward(_logits(h2[s:e], weight, bias, buf), toks[s:e], ones[: e - s], tau, want_entropy,
                                       want_lse=True))
    dtype = compute_dtype(hidden.dtype)
    def cat(i, dim=0):
        if not parts:
            return torch.zeros((2, 0) if dim else (0,), dtype=dtype, device=hidden.device)
        return torch.cat([p[i] for p in parts], dim=dim).to(dtype)

    logp, lse = cat(0).view(B, T), cat(2, dim=1)
    ent = cat(1).view(B, T) if want_entropy else None
    return logp, ent, lse


def linear_logprobs_backward(hidden, weight, bias, tokens, lse, g_logp, g_ent, ent, tau: float, eng):
    """dhidden, dweight, dbias of sum(g_logp * logp + g_ent * H), the softmax recomputed per chunk."""
    B, T, Hd = hidden.shape
    V = weight.shape[0]
    N = B * T
    dev = hidden.device
    h2 = hidden.reshape(N, Hd)
    toks = tokens.reshape(-1)
    ones = torch.ones(N, dtype=torch.bool, device=dev)
    dtype = lse.dtype
    gl = g_logp.reshape(-1).to(dtype)
    gh = None if g_ent is None else g_ent.reshape(-1).to(dtype)
    Hv = None if g_ent is None else ent.reshape(-1).to(dtype)
    dh = torch.empty(N, Hd, dtype=hidden.dtype, device=dev)
    dW = torch.zeros(V, Hd, dtype=torch.float32 if weight.dtype != torch.float64 else torch.float64, device=dev)
    db = None if bias is None else torch.zeros(V, dtype=dW.dtype, device=dev)
    one = torch.ones((), dtype=dtype, device=dev)
    step = chunk_rows(V, Hd, dev)
    buf = _chunk_buffer(step, N, V, hidden) if N else None
    for s in range(0, N, step):
        e = min(s + step, N)
        hc = h2[s:e]
        xc = _logits(hc, weight, bias, buf)
        dl = eng.vocab_backward(xc, toks[s:e], ones[: e - s], lse[:, s:e], gl[s:e], None if gh is None else gh[s:e],
                                None if Hv is None else Hv[s:e], tau, one, out=xc)
        dh[s:e] = (dl @ weight).to(hidden.dtype)
        dW.addmm_(dl.T.to(dW.dtype), hc.to(dW.dtype))
        if db is not None:
            db.add_(dl.sum(0, dtype=db.dtype))
    return dh.view(B, T, Hd), dW.to(weight.dtype), None if db is None else db.to(bias.dtype)
