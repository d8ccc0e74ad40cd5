"""Entry adapters of the fast backends: a validated Batch in, a LossOutput out, through the ops of
lambda_grpo/_ops.py (eager and compiled alike). `loss_output` is the one place a LossOutput is
assembled from an op's outputs (metric names, per-token outputs, packed per-token layout)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .config import LossConfig
from .output import LossOutput, metric_names
from ._batch import Batch
from ._compute import pack_flags
from ._ops import linear_fwd, linear_logprobs_fwd, logprobs_fwd, loss_fwd, rows_fwd
from ._rowmath import PER_TOKEN_KEYS


def loss_output(loss, metrics, seq_weight, toks, cfg: LossConfig, batch: Batch, per_token: bool) -> LossOutput:
    """The LossOutput of an op's outputs: metrics by name (metric_names order), seq_weight, and
    per-token outputs in the layout of the caller's tensors ((B, T), or (N,) packed)."""
    # the op's outputs other than the loss are non-differentiable: no detach needed
    out = dict(zip(metric_names(cfg, batch.ref_logp is not None), metrics.unbind()))
    out["seq_weight"] = seq_weight
    tokens = None
    if per_token:
        tokens = dict(zip(PER_TOKEN_KEYS, toks.unbind()))
        if batch.packed_pos is not None:
            tokens = {k: batch.to_vocab(v) for k, v in tokens.items()}
    return LossOutput(loss, out, tokens)


def _flags(batch: Batch, need_grad: bool, inplace: bool = False, per_token: bool = False,
           head_grad: bool = False) -> str:
    """`Flags(...).pack()` (the cached packing without building the tuple: this runs in every call);
    whether the kernels check the ids is the Batch's own (Batch.ids_unchecked)."""
    return pack_flags(batch.group_size, bool(need_grad), bool(inplace), bool(per_token), bool(head_grad),
                      batch.ids_unchecked)


def fast_loss(batch: Batch, cfg: LossConfig, engine: str, inplace: bool = False, per_token: bool = False) -> LossOutput:
    """The loss of a validated batch from logits on a fast engine ("torch" or "triton")."""
    need_grad = torch.is_grad_enabled() and batch.logits.requires_grad
    lam = batch.lam if cfg.uses_lambda else None
    loss, metrics, seq_weight, _, _, _, toks = loss_fwd(batch.logits, batch.parts(), lam, cfg.to_json(), engine,
                                                        _flags(batch, need_grad, inplace and need_grad, per_token))
    return loss_output(loss, metrics, seq_weight, toks, cfg, batch, per_token)


def rows_loss(logp: Tensor, entropy: Optional[Tensor], batch: Batch, cfg: LossConfig, per_token: bool = False
              ) -> LossOutput:
    """The loss of a validated batch from per-token log-probs (and entropies) in the row layout."""
    lam = batch.lam if cfg.uses_lambda else None
    loss, metrics, seq_weight, _, _, _, toks = rows_fwd(logp, entropy, batch.parts(), lam, cfg.to_json(),
                                                        _flags(batch, True, per_token=per_token))
    return loss_output(loss, metrics, seq_weight, toks, cfg, batch, per_token)


def linear_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], batch: Batch, cfg: LossConfig, engine: str,
                per_token: bool = False) -> LossOutput:
    """The loss of a validated batch from hidden states ((B, T, H) or packed (N, H)) and the LM head (V, H)."""
    need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    # a frozen LM head (e.g. only the top layers trained, or LoRA): no dW / db buffer, no dW matmul
    head_grad = need_grad and any(t is not None and t.requires_grad for t in (weight, bias))
    lam = batch.lam if cfg.uses_lambda else None
    loss, metrics, seq_weight, _, _, _, _, toks = linear_fwd(hidden, weight, bias, batch.parts(), lam, cfg.to_json(),
                                                             engine, _flags(batch, need_grad, False, per_token,
                                                                            head_grad))
    return loss_output(loss, metrics, seq_weight, toks, cfg, batch, per_token)


def fast_token_logprobs(logits: Tensor, ids: Tensor, temperature: float, engine: str) -> Tensor:
    """log_softmax(logits / tau)[ids] (B, T); ids int64 already clamped into [0, V)."""
    return logprobs_fwd(logits, ids, float(temperature), engine)[0]


def fast_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ids: Tensor, temperature: float,
                         want_entropy: bool, engine: str):
    logp, ent, _ = linear_logprobs_fwd(hidden, weight, bias, ids, float(temperature), bool(want_entropy), engine)
    return logp, (ent if want_entropy else None)
