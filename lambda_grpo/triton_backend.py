"""The Triton backend: autograd Functions over the fused kernels in `lambda_grpo.kernels`.

Layers: @triton.jit kernels (kernels/*.py) -> launchers (same files: check, allocate, pick the
config from kernels/_config.py, launch) -> the autograd Functions here -> `triton_loss` /
`triton_token_logprobs`, which api.py dispatches to for backend="triton".

Two paths (see docs/kernels.md for the pass counts):
- fused (default whenever no ratio-mode trace is used and the logits need a gradient):
  group kernel (mask only) -> one vocab kernel writing logp, entropy and dlogits -> row kernel
  (loss, metrics, dλ). The backward only rescales dlogits by the upstream gradient, which
  costs nothing when it is 1.
- two-pass (ratio-mode traces, or logits without grad): group kernel -> forward vocab kernel
  (logp, lse, entropy) -> row kernel (loss, metrics, per-token coefficients) ; backward:
  one vocab kernel writing dlogits (optionally in place over the logits).
Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before the first kernel
import; tests/conftest.py does it).
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .config import LossConfig
from .output import LossOutput, metric_names
from ._validate import Batch, fail
from .kernels._config import LOGITS_DTYPES
from .kernels.rows import group_pass, row_pass
from .kernels.vocab_bwd import scale_rows, vocab_backward
from .kernels.vocab_fused import vocab_fused
from .kernels.vocab_fwd import vocab_forward


def _check_runnable(logits: torch.Tensor) -> None:
    if logits.dtype not in LOGITS_DTYPES:
        fail("logits", f"dtype in {LOGITS_DTYPES} for backend='triton' (use 'reference' or 'torch' for float64)",
             logits.dtype)
    if logits.device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        fail("logits", "a CUDA tensor for backend='triton' (or TRITON_INTERPRET=1 set before import)",
             f"device {logits.device}")


def _rows_view(logits: torch.Tensor) -> torch.Tensor:
    B, T, V = logits.shape
    x = logits.reshape(B * T, V)
    return x if (V == 1 or x.stride(1) == 1) else x.contiguous()


def _f32(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.detach().to(torch.float32).contiguous().view(-1)


class _GRPOLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, lam, batch: Batch, cfg: LossConfig, fused: bool, inplace: bool):
        B, T, V = logits.shape
        dev = logits.device
        x2 = _rows_view(logits)
        inplace = inplace and x2.data_ptr() == logits.data_ptr() and logits.is_contiguous()
        mask = batch.mask.contiguous()
        mflat = mask.view(-1)
        tokens = batch.tokens.contiguous().view(-1)
        adv = _f32(batch.advantages)
        old = _f32(batch.old_logp)
        ref = _f32(batch.ref_logp)
        lengths, f, df, w, c = group_pass(mask, batch.group_size, cfg.aggregation, lam, cfg.length_r,
                                          cfg.trace if cfg.weight_trace else None, cfg.trace_decay)
        local = lengths.sum().to(torch.float32)
        n_tok = local if batch.num_tokens is None else batch.num_tokens.to(torch.float32)
        n_seq = (torch.full((), float(B), device=dev) if batch.num_sequences is None
                 else batch.num_sequences.to(torch.float32))
        if cfg.aggregation == "grpo":
            norm = 1.0 / n_seq
        elif cfg.aggregation == "bnpo":
            norm = 1.0 / local.clamp(min=1)
        elif cfg.aggregation == "dr_grpo":
            L = cfg.max_completion_length if cfg.max_completion_length is not None else T
            norm = 1.0 / (n_seq * L)
        else:  # dapo, lambda_grpo
            norm = 1.0 / n_tok.clamp(min=1)
        norm = norm.reshape(1).to(torch.float32)
        ent_coef = float(cfg.entropy_coef)
        hyper = dict(eps_low=cfg.eps_low, eps_high=cfg.eps_high, dual_clip=cfg.dual_clip,
                     adv_clamp_min=cfg.adv_clamp_min, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
                     entropy_coef=ent_coef)
        cflat = None if c is None else c.view(-1)
        if fused:
            logp, ent, dlogits = vocab_fused(x2, tokens, mflat, adv, w, norm, cfg.temperature, old_logp=old,
                                             ref_logp=ref, trace_coef=cflat, with_entropy=cfg.needs_entropy,
                                             out=x2 if inplace else None, **hyper)
            lse = None
        else:
            logp, lse, ent = vocab_forward(x2, tokens, mflat, cfg.temperature, cfg.needs_entropy)
            dlogits = None
        coef_lp, coef_h, parts = row_pass(
            logp.view(B, T), mask, adv.view(B, T), lengths, w,
            entropy=None if ent is None else ent.view(B, T), old_logp=None if old is None else old.view(B, T),
            ref_logp=None if ref is None else ref.view(B, T), trace_coef=c,
            ratio_trace=cfg.trace if cfg.ratio_trace else None, trace_decay=cfg.trace_decay,
            write_coef=not fused, **hyper)
        sums = parts.sum(0)
        loss = norm[0] * sums[0]
        dlam = (parts[:, 1].double() * df).sum() / n_tok.double().clamp(min=1)

        count = local.clamp(min=1)
        metrics = {"clip_frac_low": sums[2] / count, "clip_frac_high": sums[3] / count}
        metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
        metrics["ratio_mean"] = sums[4] / count
        if ref is not None:
            metrics["kl_mean"] = sums[5] / count
        if cfg.needs_entropy:
            metrics["entropy_mean"] = sums[6] / count
        if cfg.aggregation == "lambda_grpo":
            metrics["lambda"] = lam.detach().to(device=dev, dtype=torch.float32).reshape(()).clone()
        metrics["seq_weight"] = f.to(torch.float32)
        keys = metric_names(cfg, ref is not None, with_seq_weight=True)
        outs = [metrics[k] for k in keys]
        ctx.mark_non_differentiable(*outs)

        ctx.fused, ctx.inplace, ctx.temperature = fused, inplace, cfg.temperature
        ctx.shape = (B, T, V)
        ctx.lam_meta = None if lam is None else (lam.dtype, lam.device, lam.shape)
        ent_grad = ent_coef != 0 and ent is not None
        if fused:
            ctx.save_for_backward(dlogits, mflat, dlam)
        else:
            ctx.save_for_backward(x2, tokens, mflat, lse, coef_lp.view(-1), norm,
                                  ent if ent_grad else None, coef_h.view(-1) if ent_grad else None, dlam)
        return (loss, *outs)

    @staticmethod
    def backward(ctx, grad_loss, *unused):
        # VJP: loss = norm * sum_i w_i S_i is linear in the per-token terms, so
        #   dL/dlogits = grad * norm * (per-token coefficients pushed through softmax; see
        #   kernels/vocab_bwd.py), dL/dlam = grad * sum_i S_i df_i/dlam / max(1, N_tok)
        # (f enters only through w_i = f_i; no gradient reaches the policy through f).
        B, T, V = ctx.shape
        g = grad_loss.detach().reshape(1).to(torch.float32)
        dlogits = None
        if ctx.fused:
            d, mflat, dlam = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                dlogits = scale_rows(d, mflat, g).view(B, T, V)
        else:
            x2, tokens, mflat, lse, coef_lp, norm, ent, coef_h, dlam = ctx.saved_tensors
            if ctx.needs_input_grad[0]:
                dlogits = vocab_backward(x2, tokens, mflat, lse, coef_lp, g * norm, ctx.temperature, entropy=ent,
                                         coef_entropy=coef_h, out=x2 if ctx.inplace else None).view(B, T, V)
        dlam_out = None
        if ctx.lam_meta is not None and ctx.needs_input_grad[1]:
            dtype, device, shape = ctx.lam_meta
            dlam_out = (g[0].double() * dlam).to(device=device, dtype=dtype).reshape(shape)
        return dlogits, dlam_out, None, None, None, None


def triton_loss(batch: Batch, cfg: LossConfig, *, fused: Optional[bool] = None, inplace_grad: bool = False) -> LossOutput:
    """SPEC §4-§6 with the Triton kernels; differentiable w.r.t. batch.logits and batch.lam.

    fused: None picks the one-kernel forward+backward path whenever it applies (no ratio-mode
      trace and the logits need a gradient); False forces the two-pass path; True raises if
      it cannot apply.
    inplace_grad: write dlogits into the logits buffer (saves B*T*V elements). Only for callers
      that never read the logits again: with the fused path the logits are overwritten during
      the forward.
    """
    logits = batch.logits
    _check_runnable(logits)
    wants_grad = torch.is_grad_enabled() and logits.requires_grad
    can_fuse = not cfg.ratio_trace
    if fused is None:
        fused = can_fuse and wants_grad
    elif fused and not can_fuse:
        fail("fused", "False or None with trace_mode='ratio' (the coefficient needs the whole row)", fused)
    lam = batch.lam if cfg.aggregation == "lambda_grpo" else None
    outs = _GRPOLossFunction.apply(logits, lam, batch, cfg, bool(fused), bool(inplace_grad))
    keys = metric_names(cfg, batch.ref_logp is not None, with_seq_weight=True)
    return LossOutput(outs[0], dict(zip(keys, outs[1:])))


class _TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, tokens, temperature):
        B, T, V = logits.shape
        x2 = _rows_view(logits)
        tok = tokens.long().contiguous().view(-1)
        mflat = torch.ones(B * T, dtype=torch.bool, device=logits.device)
        logp, lse, _ = vocab_forward(x2, tok, mflat, temperature, False)
        ctx.save_for_backward(x2, tok, mflat, lse)
        ctx.temperature, ctx.shape = temperature, (B, T, V)
        return logp.view(B, T)

    @staticmethod
    def backward(ctx, grad):
        x2, tok, mflat, lse = ctx.saved_tensors
        B, T, V = ctx.shape
        one = torch.ones(1, device=x2.device, dtype=torch.float32)
        d = vocab_backward(x2, tok, mflat, lse, grad.to(torch.float32).contiguous().view(-1), one, ctx.temperature)
        return d.view(B, T, V), None, None


def triton_token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / tau)[tokens]: logits (B, T, V) fp32/bf16/fp16, tokens (B, T) -> (B, T) fp32.

    Differentiable w.r.t. logits; token ids are clamped into [0, V) in-kernel (api.py
    validates them first).
    """
    _check_runnable(logits)
    return _TokenLogprobsFunction.apply(logits, tokens, float(temperature))
