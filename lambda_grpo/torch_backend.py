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

from typing import Optional

import torch

from .config import LossConfig
from .output import LossOutput
from ._rowmath import TokenConstants, row_pass, token_constants, token_terms
from ._validate import Batch, compute_dtype

# Rows per chunk are chosen so a chunk holds about this many elements (fp32: 2 MiB), small
# enough to stay in a core's cache between the max, exp and sum sweeps. Measured on the 2-core
# CPU of this project at V = 151 936: 4-8 rows per chunk were fastest.
CHUNK_ELEMENTS = 1 << 19


def _rows_per_chunk(V: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(V, 1))


def _fused(cfg: LossConfig) -> bool:
    return not cfg.ratio_trace


def _load_rows(logits2d: torch.Tensor, rows: torch.Tensor, tau: float, buf: torch.Tensor) -> torch.Tensor:
    """Rows of logits as fp32 (float64 for float64 logits) scaled by 1/tau, in `buf`."""
    out = buf[: rows.numel()]
    if logits2d.dtype == out.dtype:
        torch.index_select(logits2d, 0, rows, out=out)
    else:
        out.copy_(logits2d.index_select(0, rows))
    if tau != 1.0:
        out.div_(tau)  # a true division: x * (1/tau) would add a rounding of 1/tau
    return out


def _vocab_forward(logits2d, rows, targets, tau, want_entropy, buf, ebuf):
    """For a chunk of rows: xm = x - max (in buf), e = exp(xm) (in ebuf), sum e, log-sum,
    logp = xm[y] - log sum e, H = log sum e - sum(e * xm) / sum e. Returns (xm, e, se, lse_shift, logp, H)."""
    xm = _load_rows(logits2d, rows, tau, buf)
    mx = xm.amax(dim=1, keepdim=True)
    xm.sub_(mx)
    e = torch.exp(xm, out=ebuf[: rows.numel()])
    se = e.sum(dim=1)
    lse_shift = torch.log(se)
    logp = xm.gather(1, targets[:, None]).squeeze(1) - lse_shift
    H = None
    if want_entropy:
        H = lse_shift - torch.bmm(e.unsqueeze(1), xm.unsqueeze(2)).reshape(-1) / se
    return xm, e, se, mx.squeeze(1), lse_shift, logp, H


def _write_grad(xm, p, targets, gl, gh, H, lse_shift, tau, out_rows):
    """p (consumed in place) -> dL/dlogits rows, written to out_rows (logits dtype).

    xm is x - c for any per-row constant c with log p = xm - lse_shift."""
    if gh is None:
        p.mul_((-gl / tau)[:, None])
    else:
        # -p * (gl + gh (log p + H)) = -p * (gh * xm + (gl + gh (H - lse_shift)))
        a = (gl + gh * (H - lse_shift))[:, None]
        torch.mul(xm, gh[:, None], out=xm)
        xm.add_(a)
        p.mul_(xm).mul_(-1.0 / tau)
    p.scatter_add_(1, targets[:, None], (gl / tau)[:, None])
    out_rows.copy_(p)


def _forward(logits, batch: Batch, cfg: LossConfig, need_grad: bool):
    """The vocab pass over valid tokens, then the row pass. Returns (RowPass, saved tensors)."""
    B, T, V = logits.shape
    dtype = compute_dtype(logits.dtype)
    device = logits.device
    tau = float(cfg.temperature)
    want_entropy = cfg.needs_entropy
    fused = _fused(cfg) and need_grad
    consts = token_constants(batch, cfg, dtype)

    logits2d = logits.reshape(B * T, V)
    flat_mask = batch.mask.reshape(-1)
    valid = flat_mask.nonzero().squeeze(1)
    targets_all = batch.tokens.reshape(-1)
    logp_flat = torch.zeros(B * T, dtype=dtype, device=device)
    ent_flat = torch.zeros(B * T, dtype=dtype, device=device) if want_entropy else None
    lse_flat = torch.zeros(B * T, dtype=dtype, device=device) if (need_grad and not fused) else None

    rows_per = _rows_per_chunk(V)
    buf = torch.empty(min(rows_per, max(valid.numel(), 1)), V, dtype=dtype, device=device)
    ebuf = torch.empty_like(buf)
    if fused:
        dlogits = torch.empty_like(logits2d)
        invalid = (~flat_mask).nonzero().squeeze(1)
        if invalid.numel():
            dlogits.index_fill_(0, invalid, 0)
        old_flat = None if batch.old_logp is None else batch.old_logp.reshape(-1)
        ref_flat = None if batch.ref_logp is None else batch.ref_logp.reshape(-1)
        A_flat, W_flat = consts.A.reshape(-1), consts.W.reshape(-1)
        c_flat = None if consts.coef is None else consts.coef.reshape(-1)

    for s in range(0, valid.numel(), rows_per):
        rows = valid[s:s + rows_per]
        tg = targets_all.index_select(0, rows)
        xm, e, se, mx, lse_shift, logp, H = _vocab_forward(logits2d, rows, tg, tau, want_entropy, buf, ebuf)
        logp_flat.index_copy_(0, rows, logp)
        if want_entropy:
            ent_flat.index_copy_(0, rows, H)
        if lse_flat is not None:
            lse_flat.index_copy_(0, rows, mx + lse_shift)
        if fused:
            # The token's own coefficient from the same elementwise math as the row pass
            # (no ratio trace: z = x = logp - old).
            old = logp if old_flat is None else old_flat.index_select(0, rows)
            ref = None if ref_flat is None else ref_flat.index_select(0, rows)
            coef = None if c_flat is None else c_flat.index_select(0, rows)
            terms = token_terms(logp - old, logp, ref, H, A_flat.index_select(0, rows),
                                W_flat.index_select(0, rows), coef, cfg)
            p = e.mul_((1.0 / se)[:, None])
            _write_grad(xm, p, tg, terms.g_z + terms.g_logp, terms.g_entropy, H, lse_shift, tau,
                        _RowsView(dlogits, rows))

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


class _RowsView:
    """Destination for `_write_grad`: `copy_` scatters the chunk's rows into a (N, V) buffer."""

    def __init__(self, target2d: torch.Tensor, rows: torch.Tensor):
        self.target, self.rows = target2d, rows

    def copy_(self, src: torch.Tensor) -> None:
        self.target.index_copy_(0, self.rows, src.to(self.target.dtype))


def _two_pass_backward(ctx, grad_out):
    logits, lse_flat, gl_flat, gh_flat, ent_flat = ctx.saved_tensors
    B, T, V = logits.shape
    dtype = lse_flat.dtype
    tau = float(ctx.cfg.temperature)
    logits2d = logits.reshape(B * T, V)
    flat_mask = ctx.batch.mask.reshape(-1)
    valid = flat_mask.nonzero().squeeze(1)
    targets_all = ctx.batch.tokens.reshape(-1)
    go = grad_out.to(dtype)
    dlogits = torch.zeros_like(logits2d)
    rows_per = _rows_per_chunk(V)
    buf = torch.empty(min(rows_per, max(valid.numel(), 1)), V, dtype=dtype, device=logits.device)
    ebuf = torch.empty_like(buf)
    has_ent = gh_flat.numel() > 0
    for s in range(0, valid.numel(), rows_per):
        rows = valid[s:s + rows_per]
        tg = targets_all.index_select(0, rows)
        x = _load_rows(logits2d, rows, tau, buf)
        x.sub_(lse_flat.index_select(0, rows)[:, None])  # x - lse = log p
        p = torch.exp(x, out=ebuf[: rows.numel()])
        gl = gl_flat.index_select(0, rows) * go
        gh = gh_flat.index_select(0, rows) * go if has_ent else None
        H = ent_flat.index_select(0, rows) if has_ent else None
        zeros = torch.zeros_like(gl)
        _write_grad(x, p, tg, gl, gh, H, zeros, tau, _RowsView(dlogits, rows))
    return dlogits.view(B, T, V)


def torch_loss(batch: Batch, cfg: LossConfig) -> LossOutput:
    """backend="torch" for a validated batch (see the module docstring for the schedule)."""
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
        buf = torch.empty(min(rows_per, max(B * T, 1)), V, dtype=dtype, device=logits.device)
        ebuf = torch.empty_like(buf)
        for s in range(0, B * T, rows_per):
            rows = torch.arange(s, min(s + rows_per, B * T), device=logits.device)
            _, _, _, mx, lse_shift, lp, _ = _vocab_forward(logits2d, rows, targets[s:s + rows_per], tau, False, buf, ebuf)
            logp[s:s + rows.numel()] = lp
            lse[s:s + rows.numel()] = mx + lse_shift
        ctx.tau = tau
        ctx.save_for_backward(logits, targets, lse)
        return logp.view(B, T)

    @staticmethod
    def backward(ctx, grad_logp):
        # dL/dlogits_j = g (1[j = y] - p_j) / tau, p recomputed from the saved lse
        logits, targets, lse = ctx.saved_tensors
        B, T, V = logits.shape
        logits2d = logits.reshape(B * T, V)
        g = grad_logp.reshape(-1).to(lse.dtype)
        dlogits = torch.empty_like(logits2d)
        rows_per = _rows_per_chunk(V)
        buf = torch.empty(min(rows_per, max(B * T, 1)), V, dtype=lse.dtype, device=logits.device)
        ebuf = torch.empty_like(buf)
        for s in range(0, B * T, rows_per):
            rows = torch.arange(s, min(s + rows_per, B * T), device=logits.device)
            x = _load_rows(logits2d, rows, ctx.tau, buf)
            x.sub_(lse[s:s + rows.numel(), None])
            p = torch.exp(x, out=ebuf[: rows.numel()])
            _write_grad(x, p, targets[s:s + rows.numel()], g[s:s + rows.numel()], None, None, None, ctx.tau,
                        dlogits[s:s + rows.numel()])
        return dlogits.view(B, T, V), None, None


def torch_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / tau)[tokens] in chunks: (B, T, V) -> (B, T) fp32 (float64 for float64)."""
    return _TorchTokenLogprobs.apply(logits, tokens.long(), float(temperature))
