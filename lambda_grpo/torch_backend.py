"""backend="torch": the memory-bounded fast path for CPU (and any device).

One custom autograd Function walks the valid tokens in chunks of rows small enough to stay in
cache. Per chunk it makes one exp pass over the vocabulary (max, exp, sum) and keeps only
per-token fp32 state (logp, the log-sum-exp, the entropy). Nothing of size (B*T, V) is
allocated except the gradient itself.

Two schedules (chosen per call, see `_fused`):
- fused: with no ratio-mode trace, d(loss)/d(logp_t) depends only on token t's own logp, so
  the chunk that computes logp also writes its dlogits rows while the softmax is still in
  cache: one exp pass in total for forward + backward. The gradient is kept for backward
  (Liger-Kernel's chunked losses do the same).
- two-pass: with a ratio-mode trace the coefficient of token t depends on the whole row
  (a reverse scan), so the forward saves the log-sum-exp and the backward recomputes
  p = exp(x - lse) in one more pass.

VJP of the vocab pass, per token with x = logits / tau, p = softmax(x), logp = x_y - lse,
H = lse - sum_j p_j x_j, and upstream coefficients gl = dL/dlogp, gh = dL/dH:
    dL/dx_j = gl (1[j = y] - p_j) - gh p_j (log p_j + H)
    dL/dlogits_j = dL/dx_j / tau
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, List, Tuple

import torch

from .config import LossConfig
from .output import LossOutput
from ._rowmath import row_pass, token_constants, token_terms
from ._validate import Batch, compute_dtype

# Rows per chunk are chosen so a chunk holds about this many elements (fp32: 2 MiB), small
# enough to stay in a core's cache between the max, exp and sum sweeps. Measured on the 2-core
# CPU of this project at V = 151 936: 4-8 rows per chunk were fastest.
CHUNK_ELEMENTS = 1 << 19


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _fused(cfg: LossConfig) -> bool:
    return not cfg.ratio_trace


def _runs(flat_mask: torch.Tensor) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int]]]:
    """Maximal runs [start, end) of valid and of masked rows (one host sync, O(B*T))."""
    m = flat_mask.to(torch.int8).cpu()
    edges = torch.diff(torch.cat([torch.zeros(1, dtype=torch.int8), m, torch.zeros(1, dtype=torch.int8)]))
    starts = (edges == 1).nonzero().squeeze(1).tolist()
    ends = (edges == -1).nonzero().squeeze(1).tolist()
    valid = list(zip(starts, ends))
    gaps, prev = [], 0
    for a, b in valid:
        if a > prev:
            gaps.append((prev, a))
        prev = b
    if prev < m.numel():
        gaps.append((prev, m.numel()))
    return valid, gaps


def _chunks(runs: List[Tuple[int, int]], rows_per: int) -> Iterator[Tuple[int, int]]:
    """Contiguous row ranges of at most rows_per rows: the chunks are plain slices, no gather."""
    for a, b in runs:
        for s in range(a, b, rows_per):
            yield s, min(s + rows_per, b)


def _scaled(src: torch.Tensor, tau: float, out: torch.Tensor) -> torch.Tensor:
    """out = src / tau in the compute dtype (a true division: x * (1/tau) would round 1/tau)."""
    out.copy_(src)
    if tau != 1.0:
        out.div_(tau)
    return out


def _vocab_forward(src, targets, tau, want_entropy, buf, e_out):
    """One exp pass over a chunk of rows src (n, V).

    Leaves xm = x - max(x) in buf and e = exp(xm) in e_out; returns
    (xm, e, se = sum e, lse = max + log se, lse_shift = log se, logp = xm[y] - log se, H)
    with H = log se - sum(e * xm) / se (None unless asked)."""
    n = src.shape[0]
    xm = buf[:n]
    if src.dtype == xm.dtype and tau == 1.0:
        mx = src.amax(dim=1, keepdim=True)
        torch.sub(src, mx, out=xm)
    else:
        _scaled(src, tau, xm)
        mx = xm.amax(dim=1, keepdim=True)
        xm.sub_(mx)
    e = torch.exp(xm, out=e_out)
    se = e.sum(dim=1)
    lse_shift = torch.log(se)
    logp = xm.gather(1, targets[:, None]).squeeze(1) - lse_shift
    H = None
    if want_entropy:
        # vecdot reduces pairwise; a bmm here accumulates serially and loses ~1e-4 at V = 151 936
        H = lse_shift - torch.linalg.vecdot(e, xm) / se
    return xm, e, se, mx.squeeze(1) + lse_shift, lse_shift, logp, H


def _write_grad(xm, p, targets, gl, gh, H, lse_shift, tau, out):
    """Turn p (n, V) in place into dL/dlogits rows and store them in `out` (logits dtype).

    xm = x - c for a per-row constant c with log p = xm - lse_shift (only read with entropy).
    dL/dx_j = gl (1[j = y] - p_j) - gh p_j (log p_j + H); divided by tau for dL/dlogits."""
    if gh is None:
        p.mul_((-gl / tau)[:, None])
    else:
        # -p (gl + gh (log p + H)) = -p (gh xm + (gl + gh (H - lse_shift)))
        a = (gl + gh * (H - lse_shift))[:, None]
        torch.mul(xm, gh[:, None], out=xm)
        xm.add_(a)
        p.mul_(xm).mul_(-1.0 / tau)
    p.scatter_add_(1, targets[:, None], (gl / tau)[:, None])
    if out.data_ptr() != p.data_ptr():
        out.copy_(p)


def _for_each_chunk(chunks: List[Tuple[int, int]], body, make_buffers, device: torch.device) -> None:
    """Run body(s, e, buffers) over the chunks.

    On a multi-threaded CPU the chunks are split between torch.get_num_threads() Python
    workers, each running its ops single-threaded on its own buffers (torch releases the GIL
    inside ops). Chunks write disjoint rows, so no locking is needed. Why not leave the
    parallelism to torch's OpenMP: a chunk's ops are ~1 ms each, so every op is a parallel
    region with a barrier, and on a CPU that other jobs share a barrier waits for a
    descheduled thread (measured here: 26 s instead of 0.8 s for one step at N = 2048,
    V = 151 936 with a second job running). Independent workers have no barrier.
    """
    nt = torch.get_num_threads() if device.type == "cpu" else 1
    if nt <= 1 or len(chunks) < 2:
        bufs = make_buffers()
        for s, e in chunks:
            body(s, e, bufs)
        return

    def work(part):
        torch.set_num_threads(1)
        with torch.no_grad():  # grad mode is thread-local; the caller's forward runs without it
            bufs = make_buffers()
            for s, e in part:
                body(s, e, bufs)

    parts = [chunks[i::nt] for i in range(nt)]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=nt) as pool:
            for f in [pool.submit(work, part) for part in parts]:
                f.result()
    finally:
        torch.set_num_threads(nt)


def _buffers(rows_per: int, n_rows: int, V: int, dtype, device):
    n = max(1, min(rows_per, n_rows))
    return torch.empty(n, V, dtype=dtype, device=device), torch.empty(n, V, dtype=dtype, device=device)


def _forward(logits, batch: Batch, cfg: LossConfig, need_grad: bool):
    """The vocab pass over valid tokens, then the row pass. Returns (RowPass, fused, saved)."""
    B, T, V = logits.shape
    dtype = compute_dtype(logits.dtype)
    device = logits.device
    tau = float(cfg.temperature)
    want_entropy = cfg.needs_entropy
    fused = _fused(cfg) and need_grad
    consts = token_constants(batch, cfg, dtype)

    logits2d = logits.reshape(B * T, V)
    valid_runs, gaps = _runs(batch.mask.reshape(-1))
    n_valid = sum(b - a for a, b in valid_runs)
    targets = batch.tokens.reshape(-1)
    logp_flat = torch.zeros(B * T, dtype=dtype, device=device)
    ent_flat = torch.zeros(B * T, dtype=dtype, device=device) if want_entropy else None
    lse_flat = torch.zeros(B * T, dtype=dtype, device=device) if (need_grad and not fused) else None
    rows_per = _rows_per_chunk(V)

    if fused:
        dlogits = torch.empty_like(logits2d)
        for a, b in gaps:
            dlogits[a:b].zero_()
        direct = dlogits.dtype == dtype  # exp can land straight in the gradient rows
        old_flat = None if batch.old_logp is None else batch.old_logp.reshape(-1)
        ref_flat = None if batch.ref_logp is None else batch.ref_logp.reshape(-1)
        A_flat, W_flat = consts.A.reshape(-1), consts.W.reshape(-1)
        c_flat = None if consts.coef is None else consts.coef.reshape(-1)

    def body(s, e, bufs):
        buf, ebuf = bufs
        tg = targets[s:e]
        e_out = dlogits[s:e] if fused and direct else ebuf[: e - s]
        xm, ex, se, lse, lse_shift, logp, H = _vocab_forward(logits2d[s:e], tg, tau, want_entropy, buf, e_out)
        logp_flat[s:e] = logp
        if want_entropy:
            ent_flat[s:e] = H
        if lse_flat is not None:
            lse_flat[s:e] = lse
        if fused:
            # The token's own coefficient, from the same elementwise math as the row pass
            # (no ratio trace: z = x = logp - old).
            old = logp if old_flat is None else old_flat[s:e]
            terms = token_terms(logp - old, logp, None if ref_flat is None else ref_flat[s:e], H, A_flat[s:e],
                                W_flat[s:e], None if c_flat is None else c_flat[s:e], cfg)
            p = ex.mul_((1.0 / se)[:, None])
            _write_grad(xm, p, tg, terms.g_z + terms.g_logp, terms.g_entropy, H, lse_shift, tau, dlogits[s:e])

    _for_each_chunk(list(_chunks(valid_runs, rows_per)), body,
                    lambda: _buffers(rows_per, n_valid, V, dtype, device), device)

    ent_bt = None if ent_flat is None else ent_flat.view(B, T)
    rp = row_pass(logp_flat.view(B, T), ent_bt, batch, cfg, consts)
    if not need_grad:
        saved = ()
    elif fused:
        saved = (dlogits,)
    else:
        empty = torch.empty(0, dtype=dtype, device=device)
        gh = empty if rp.dentropy is None else rp.dentropy.reshape(-1)
        saved = (logits, lse_flat, rp.dlogp.reshape(-1), gh, empty if ent_flat is None else ent_flat)
    return rp, fused, saved


def _recompute_grad(logits2d, runs, gaps, targets, lse, gl, gh, H, tau, dtype):
    """Backward vocab pass: p = exp(x - lse) recomputed per chunk, written as dL/dlogits."""
    N, V = logits2d.shape
    dlogits = torch.empty_like(logits2d)
    for a, b in gaps:
        dlogits[a:b].zero_()
    rows_per = _rows_per_chunk(V)
    direct = dlogits.dtype == dtype

    def body(s, e, bufs):
        logp_all = _scaled(logits2d[s:e], tau, bufs[0][: e - s]).sub_(lse[s:e, None])  # x - lse = log p
        out = dlogits[s:e]
        p = torch.exp(logp_all, out=out if direct else bufs[1][: e - s])
        _write_grad(logp_all, p, targets[s:e], gl[s:e], None if gh is None else gh[s:e],
                    None if H is None else H[s:e], torch.zeros_like(gl[s:e]), tau, out)

    _for_each_chunk(list(_chunks(runs, rows_per)), body, lambda: _buffers(rows_per, N, V, dtype, logits2d.device),
                    logits2d.device)
    return dlogits


class _TorchGRPOLoss(torch.autograd.Function):
    """(logits (B, T, V), lam 0-d or None) -> loss 0-d; metrics go out through `holder`."""

    @staticmethod
    def forward(ctx, logits, lam, batch: Batch, cfg: LossConfig, holder: dict):
        rp, fused, saved = _forward(logits, batch, cfg, need_grad=ctx.needs_input_grad[0])
        holder["metrics"] = rp.metrics
        ctx.cfg, ctx.batch, ctx.fused = cfg, batch, fused
        ctx.dlam = rp.dlam
        ctx.lam_dtype = None if lam is None else lam.dtype
        ctx.save_for_backward(*saved)
        return rp.loss

    @staticmethod
    def backward(ctx, grad_out):
        dlogits = dlam = None
        if ctx.needs_input_grad[0]:
            if ctx.fused:
                (dlogits,) = ctx.saved_tensors
                if not bool(grad_out == 1):
                    dlogits = dlogits * grad_out.to(dlogits.dtype)
                dlogits = dlogits.view(ctx.batch.logits.shape)
            else:
                dlogits = _two_pass_backward(ctx, grad_out)
        if ctx.needs_input_grad[1] and ctx.dlam is not None:
            dlam = (grad_out * ctx.dlam).to(ctx.lam_dtype)
        return dlogits, dlam, None, None, None


def two_pass_backward(logits, tokens, mask, lse, gl, gh, H, grad_out, tau: float):
    """dL/dlogits (B, T, V) of the two-pass schedule from the saved per-token state.

    lse, gl = dL/dlogp, gh = dL/dH and H are flat (B*T,); gh and H are None without an entropy
    term. Shared by the eager backward and the torch.compile op `lambda_grpo::loss_bwd`."""
    B, T, V = logits.shape
    go = grad_out.to(lse.dtype)
    runs, gaps = _runs(mask.reshape(-1))
    dl = _recompute_grad(logits.reshape(B * T, V), runs, gaps, tokens.reshape(-1), lse, gl * go,
                         None if gh is None else gh * go, H, tau, lse.dtype)
    return dl.view(B, T, V)


def _two_pass_backward(ctx, grad_out):
    logits, lse_flat, gl_flat, gh_flat, ent_flat = ctx.saved_tensors
    has_ent = gh_flat.numel() > 0
    return two_pass_backward(logits, ctx.batch.tokens, ctx.batch.mask, lse_flat, gl_flat,
                             gh_flat if has_ent else None, ent_flat if has_ent else None, grad_out,
                             float(ctx.cfg.temperature))


def torch_loss(batch: Batch, cfg: LossConfig) -> LossOutput:
    """backend="torch" for a validated batch (see the module docstring for the schedule).

    While torch.compile traces, the same computation runs behind torch.library custom ops
    (`lambda_grpo._ops`), which Dynamo treats as opaque nodes with fake shapes."""
    if torch.compiler.is_compiling():
        from ._ops import compiled_torch_loss

        return compiled_torch_loss(batch, cfg)
    holder: dict = {}
    loss = _TorchGRPOLoss.apply(batch.logits, batch.lam, batch, cfg, holder)
    return LossOutput(loss, {k: v.detach() for k, v in holder["metrics"].items()})


class _TorchTokenLogprobs(torch.autograd.Function):
    """(logits (B, T, V), tokens (B, T)) -> logp (B, T); backward recomputes p from the saved lse."""

    @staticmethod
    def forward(ctx, logits, tokens, tau: float):
        B, T, V = logits.shape
        dtype = compute_dtype(logits.dtype)
        logits2d = logits.reshape(B * T, V)
        targets = tokens.reshape(-1).clamp(0, V - 1)
        logp = torch.empty(B * T, dtype=dtype, device=logits.device)
        lse = torch.empty(B * T, dtype=dtype, device=logits.device)
        rows_per = _rows_per_chunk(V)

        def body(s, e, bufs):
            out = _vocab_forward(logits2d[s:e], targets[s:e], tau, False, bufs[0], bufs[1][: e - s])
            lse[s:e], logp[s:e] = out[3], out[5]

        _for_each_chunk(list(_chunks([(0, B * T)], rows_per)), body,
                        lambda: _buffers(rows_per, B * T, V, dtype, logits.device), logits.device)
        ctx.tau = tau
        ctx.save_for_backward(logits, targets, lse)
        return logp.view(B, T)

    @staticmethod
    def backward(ctx, grad_logp):
        # dL/dlogits_j = g (1[j = y] - p_j) / tau, p recomputed from the saved lse
        logits, targets, lse = ctx.saved_tensors
        B, T, V = logits.shape
        g = grad_logp.reshape(-1).to(lse.dtype)
        dl = _recompute_grad(logits.reshape(B * T, V), [(0, B * T)], [], targets, lse, g, None, None, ctx.tau, lse.dtype)
        return dl.view(B, T, V), None, None


def torch_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / tau)[tokens] in chunks: (B, T, V) -> (B, T) fp32 (float64 for float64)."""
    return _TorchTokenLogprobs.apply(logits, tokens.long(), float(temperature))
