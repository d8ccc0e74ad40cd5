"""The Triton engine: the vocabulary passes and the row pass of backend="triton" as fused kernels.

The same interface as the torch engine (lambda_grpo/_vocab_torch.py), so that one autograd
path (lambda_grpo/_ops.py) drives both. Layers: @triton.jit kernels (lambda_grpo/kernels/*.py) ->
launchers (same files: check, allocate, pick the config from lambda_grpo/kernels/_config.py, launch) ->
this engine (adapts Batch / TokenConstants to the launchers) -> the custom ops.

Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (set before the first
kernel import; tests/conftest.py does it).
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import LossConfig
from .output import metric_names
from ._batch import Batch
from ._rowmath import (CLIP_CODES, FusedInputs, RowPass, TokenConstants, broadcast_rows, log_ratio, ratio_map,
                       ratio_map_backward, row_coefficients)
from ._validate import fail
from .kernels._config import LOGITS_DTYPES
from .kernels.groups import launch_group_weights
from .kernels.rows import launch_finish, launch_finish_tokens, launch_rows
from .kernels.vocab_bwd import scale_rows, vocab_backward as _vocab_backward
from .kernels.vocab_fused import vocab_fused as _vocab_fused
from .kernels.vocab_fwd import vocab_forward as _vocab_forward, vocab_fwd_kernel


def kernels_interpreted() -> bool:
    """Whether the kernels were created by the Triton interpreter. triton.jit decides once, when
    a kernel module is imported (reading TRITON_INTERPRET then), so the environment variable
    alone says nothing: it may have been set after this module was imported."""
    return _INTERPRETED


def _interpreted() -> bool:
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # a Triton without the interpreter
        return False
    return isinstance(vocab_fwd_kernel, InterpretedFunction)


_INTERPRETED = _interpreted()


def check_runnable(logits: torch.Tensor, name: str = "logits") -> None:
    """backend="triton" needs fp32/bf16/fp16 inputs on CUDA, or kernels loaded by the interpreter;
    `name` is the caller's argument (logits, or hidden for the hidden-state route)."""
    if logits.dtype not in LOGITS_DTYPES:
        fail(name, f"dtype in {LOGITS_DTYPES} for backend='triton' (use 'reference' or 'torch' for float64)",
             logits.dtype)
    if logits.device.type != "cuda" and not kernels_interpreted():
        raise ValueError(
            f"{name}: expected a CUDA tensor for backend='triton', got device {logits.device}. On a CPU use "
            "backend='torch' (or 'auto'). The Triton interpreter runs these kernels on a CPU only when "
            "TRITON_INTERPRET=1 is in the environment before lambda_grpo's Triton kernels are loaded; this "
            "process has loaded them without it, so setting it now has no effect: start Python with it, "
            "e.g. `TRITON_INTERPRET=1 python script.py`.")


def _f32(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A contiguous fp32 tensor without autograd history, of any shape (the kernels index it
    flat); no op when x is one already (the usual case: the row math hands over such tensors,
    and every op here is host time)."""
    if x is None:
        return None
    if x.requires_grad:
        x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    if not x.is_contiguous():
        x = x.contiguous()
    return x


def _f32s(x: torch.Tensor) -> torch.Tensor:
    """x in fp32 without autograd history, strides kept (the kernels take them: a broadcast view
    of per-sequence values is read where it lies)."""
    if x.requires_grad:
        x = x.detach()
    return x if x.dtype == torch.float32 else x.float()


def vocab_forward(logits2d, tokens, mask, tau: float, want_entropy: bool, want_lse: bool,
                  id_flag: Optional[torch.Tensor] = None):
    logp, lse, ent = _vocab_forward(logits2d, tokens, mask, tau, want_entropy, id_flag=id_flag)
    return logp, ent, lse if want_lse else None


def vocab_fused(logits2d, tokens, mask, tau: float, want_entropy: bool, inputs: FusedInputs, cfg: LossConfig,
                out: Optional[torch.Tensor] = None, terms_out: Optional[torch.Tensor] = None,
                id_flag: Optional[torch.Tensor] = None):
    return _vocab_fused(logits2d, tokens, mask, _f32s(inputs.A), _f32s(inputs.W), tau, old_logp=_f32(inputs.old_logp),
                        ref_logp=_f32(inputs.ref_logp), trace_coef=_f32(inputs.coef), eps_low=cfg.eps_low,
                        eps_high=cfg.eps_high, dual_clip=cfg.dual_floor, surrogate=cfg.surrogate,
                        sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg, beta=cfg.beta,
                        kl_estimator=cfg.kl_estimator, kl_ratio_weighted=cfg.kl_ratio_weighted,
                        entropy_coef=cfg.entropy_coef, with_entropy=want_entropy, out=out, terms_out=terms_out,
                        id_flag=id_flag)


def vocab_backward(logits2d, tokens, mask, lse, gl, gh, H, tau: float, scale: torch.Tensor,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    s = scale if (scale.dtype == torch.float32 and scale.device == logits2d.device) else scale.to(
        device=logits2d.device, dtype=torch.float32)
    lse = _f32s(lse) if isinstance(lse, torch.Tensor) else (_f32(lse[0]), _f32(lse[1]))
    return _vocab_backward(logits2d, tokens, mask, lse, _f32(gl), s, tau,
                           entropy=_f32(H) if gh is not None else None, coef_entropy=_f32(gh), out=out)


# the vocabulary kernels check counted token ids themselves (vocab_forward / vocab_fused take
# `id_flag`): validation leaves that value rule to them (lambda_grpo/_validate.py, eager only)
CHECKS_IDS = True
# the kernels take (B, T, V) logits with their strides (lambda_grpo/kernels/_launch.py:row_layout)
ROWS_3D = True
# the value rules' poison is applied by the finish and scale kernels (no torch op)
APPLIES_POISON = True
# apply an upstream gradient to a saved gradient in place, on the device (lambda_grpo/_ops.py:_upstream)
RESCALE_IN_PLACE = True
# lambda-GRPO's group weights in one launch (lambda_grpo/kernels/groups.py)
group_weights = launch_group_weights


def scale_(d2d: torch.Tensor, mask: torch.Tensor, g: torch.Tensor, poison: Optional[torch.Tensor] = None
           ) -> torch.Tensor:
    """In place d *= g on the valid rows, NaN under `poison`; the kernel skips the work when g == 1
    and no poison (no host sync). d2d: (N, V), or a contiguous (B, T, V)."""
    if g.numel() != 1 or g.dtype != torch.float32 or g.device != d2d.device:
        g = g.detach().reshape(1).to(device=d2d.device, dtype=torch.float32)
    return scale_rows(d2d, mask, g, poison)


def finish_fused(terms: torch.Tensor, entropy: Optional[torch.Tensor], batch: Batch, cfg: LossConfig,
                 consts: TokenConstants, per_token: bool = False) -> RowPass:
    """The RowPass of the fused schedule from the terms its vocabulary kernel wrote (`terms_out` of
    vocab_fused: (4, *vocab mask shape) = l, rho, kl, clip code per token): loss, dlam and the
    metrics in one launch (kernels/rows.py:finish_tokens_kernel), no row pass. entropy: the
    vocabulary pass's, in the vocabulary layout, or None. dL/dlogp is not returned: the vocabulary
    kernel wrote the gradient."""
    has_ref = batch.ref_logp is not None
    names = metric_names(cfg, has_ref)
    if batch.packed_pos is None:
        mask, w, dseq, T = batch.mask, consts.w_row, consts.dseq_weight, batch.shape[1]
    else:  # the tokens are packed: their row weights gathered to them
        mask, T = batch.vocab_mask, batch.vocab_mask.numel()
        like = consts.adv
        w = batch.to_vocab(broadcast_rows(consts.w_row, like))
        dseq = None if consts.dseq_weight is None else batch.to_vocab(broadcast_rows(consts.dseq_weight, like))
    loss, dlam, vec = launch_finish_tokens(terms, _f32(entropy), mask, _f32s(w), None if dseq is None else _f32s(dseq),
                                           has_ref, len(names), T, poison=batch.poison)
    _fill_metrics(vec, 4 + has_ref + (entropy is not None), None, cfg, batch, consts)
    metrics = {"seq_weight": consts.seq_weight}  # the rest are `vec` (RowPass.metric_vector), read as one
    tokens = None
    if per_token:
        planes = terms.unbind()  # (B, T) each; packed: (N,) each, into the row layout
        planes = planes if batch.packed_pos is None else [batch.to_rows(t) for t in planes]
        ent = None if entropy is None else batch.to_rows(entropy)
        tokens = _token_outputs(planes[0], planes[1], planes[2], planes[3], ent)
    return RowPass(loss, None, None, dlam, metrics, tokens, metric_vector=vec, poisoned=True)


def _named_metrics(vec: torch.Tensor, names, k: int, phi: Optional[torch.Tensor], cfg: LossConfig, batch: Batch,
                   consts: TokenConstants) -> dict:
    """The metrics dict of a finish kernel's vector (it wrote the first k), with phi_mean (VESPO)
    and lambda filled in here, and seq_weight."""
    _fill_metrics(vec, k, phi, cfg, batch, consts)
    metrics = dict(zip(names, vec.unbind()))
    metrics["seq_weight"] = consts.seq_weight
    return metrics


def _fill_metrics(vec: torch.Tensor, k: int, phi: Optional[torch.Tensor], cfg: LossConfig, batch: Batch,
                  consts: TokenConstants) -> None:
    """phi_mean (VESPO) and lambda into a finish kernel's metric vector, after the k it wrote."""
    if phi is not None:  # VESPO (zeros where masked)
        vec[k:k + 1].copy_((phi.sum() / consts.count.clamp(min=1)).reshape(1))
        k += 1
    if cfg.uses_lambda:
        lam = batch.lam.detach() if torch.is_grad_enabled() else batch.lam  # an op's body records nothing
        vec[k].copy_(lam.reshape(()))


def _token_outputs(loss, ratio, kl, clip, entropy) -> dict:
    """The per-token outputs (PER_TOKEN_KEYS) of a kernel's planes; clip: the code 1 low + 2 high
    + 4 dual."""
    tokens = {"loss": loss, "ratio": ratio, "kl": kl,
              "entropy": entropy if entropy is not None else torch.zeros_like(loss)}
    code = clip.to(torch.int32)
    for key, bit in CLIP_CODES.items():
        tokens[key] = (code & bit).ne(0).to(loss.dtype)
    return tokens


def row_pass(logp: torch.Tensor, entropy: Optional[torch.Tensor], batch: Batch, cfg: LossConfig,
             consts: TokenConstants, per_token: bool = False, want_coef: bool = True) -> RowPass:
    """`_rowmath.row_pass` computed by the row kernel (fp32). The sequence ratio (GSPO) and
    VESPO's weight are row reductions of the log-ratio done here with the torch engine's own
    functions (`_rowmath.ratio_map`, `row_coefficients`, O(B T)); the kernel takes the given z
    and returns dL/dz, whose VJP (`ratio_map_backward`) is added to dL/dlogp."""
    B, T = batch.mask.shape
    mask = batch.mask
    coef, z, phi = consts.coef, None, None
    if cfg.sequence_ratio or cfg.surrogate == "vespo":
        x = log_ratio(logp.detach(), batch, mask)
        coef, phi = row_coefficients(x, consts, cfg)
        z = ratio_map(x, mask, cfg) if cfg.sequence_ratio else None
    coef_lp, coef_h, parts, toks, gz, clip = launch_rows(
        logp.contiguous(), mask.contiguous(), _f32s(consts.adv), consts.lengths.contiguous(),
        _f32s(consts.w_row), entropy=None if entropy is None else entropy.contiguous(),
        old_logp=_f32(batch.old_logp), ref_logp=_f32(batch.ref_logp), trace_coef=_f32(coef), z=_f32(z),
        ratio_trace=cfg.trace if cfg.ratio_trace else None, trace_decay=cfg.trace_decay, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, dual_clip=cfg.dual_floor, surrogate=cfg.surrogate,
        sapo_tau_pos=cfg.sapo_tau_pos, sapo_tau_neg=cfg.sapo_tau_neg, beta=cfg.beta, kl_estimator=cfg.kl_estimator,
        kl_ratio_weighted=cfg.kl_ratio_weighted, entropy_coef=cfg.entropy_coef, write_coef=want_coef,
        write_tokens=per_token, coef_buffers=want_coef)
    if gz is not None:
        coef_lp = coef_lp + ratio_map_backward(gz, mask, cfg)
    # loss, dlam and the metrics from the per-row sums in one launch (kernels/rows.py:finish_kernel)
    names = metric_names(cfg, batch.ref_logp is not None)
    dseq = None if consts.dseq_weight is None else _f32(consts.dseq_weight)
    loss, dlam, vec = launch_finish(parts, consts.lengths, dseq, batch.ref_logp is not None, entropy is not None,
                                    len(names), poison=batch.poison)
    k = 4 + (batch.ref_logp is not None) + (entropy is not None)  # the slots the kernel wrote
    metrics = _named_metrics(vec, names, k, phi, cfg, batch, consts)
    tokens = None
    if per_token:
        tokens = _token_outputs(toks[0], toks[1], toks[2], clip, entropy)
    has_h = cfg.entropy_coef != 0 and entropy is not None
    return RowPass(loss, coef_lp, coef_h if has_h else None, dlam, metrics, tokens, metric_vector=vec, poisoned=True)
