"""torch.library custom ops, so that torch.compile(fullgraph=True) traces `grpo_loss` without breaks.

The vocab pass walks data-dependent runs of valid tokens with a Python loop, which Dynamo
cannot trace. Under torch.compile the torch backend is therefore called through two opaque
custom ops with fake (meta) implementations:

    lambda_grpo::loss_fwd(...) -> (loss, metrics (K,), seq_weight (B,), dlam, state)
    lambda_grpo::loss_bwd(logits, tokens, mask, state, grad_loss, config) -> dlogits

`state` is what backward needs: the gradient itself (B, T, V) when the schedule is fused, or
(4, B*T) rows [lse, dL/dlogp, dL/dH, H] for the two-pass schedule. The config travels as a JSON
string (hashable, part of the schema), so changing a hyper-parameter does not need new code,
only a new constant in the graph.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import LossConfig
from .output import metric_names
from ._validate import Batch, compute_dtype


@lru_cache(maxsize=64)
def config_from_str(s: str) -> LossConfig:
    return LossConfig(**json.loads(s))


def _batch(logits, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size):
    return Batch(logits, tokens, mask, advantages, old_logp, ref_logp, lam, group_size, num_tokens, num_sequences)


@torch.library.custom_op("lambda_grpo::loss_fwd", mutates_args=())
def loss_fwd(logits: Tensor, tokens: Tensor, mask: Tensor, advantages: Tensor, old_logp: Optional[Tensor],
             ref_logp: Optional[Tensor], lam: Optional[Tensor], num_tokens: Optional[Tensor],
             num_sequences: Optional[Tensor], group_size: int, config: str, need_grad: bool
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .torch_backend import _forward

    cfg = config_from_str(config)
    batch = _batch(logits, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size)
    rp, fused, saved = _forward(logits, batch, cfg, need_grad)
    dtype = compute_dtype(logits.dtype)
    metrics = torch.stack([rp.metrics[k].to(dtype) for k in metric_names(cfg, ref_logp is not None)])
    dlam = rp.dlam if rp.dlam is not None else torch.zeros((), dtype=dtype, device=logits.device)
    if not need_grad:
        state = torch.empty(0, dtype=dtype, device=logits.device)
    elif fused:
        state = saved[0].view(logits.shape)
    else:
        _, lse, gl, gh, ent = saved
        n = lse.numel()
        state = torch.stack([lse, gl, gh if gh.numel() else torch.zeros(n, dtype=dtype, device=lse.device),
                             ent if ent.numel() else torch.zeros(n, dtype=dtype, device=lse.device)])
    return rp.loss.clone(), metrics, rp.metrics["seq_weight"].clone(), dlam.clone(), state


@loss_fwd.register_fake
def _(logits, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size, config, need_grad):
    cfg = config_from_str(config)
    B, T, V = logits.shape
    dtype = compute_dtype(logits.dtype)
    k = len(metric_names(cfg, ref_logp is not None))
    if not need_grad:
        state = logits.new_empty(0, dtype=dtype)
    elif not cfg.ratio_trace:
        state = logits.new_empty(B, T, V)
    else:
        state = logits.new_empty(4, B * T, dtype=dtype)
    return (logits.new_empty((), dtype=dtype), logits.new_empty(k, dtype=dtype), logits.new_empty(B, dtype=dtype),
            logits.new_empty((), dtype=dtype), state)


@torch.library.custom_op("lambda_grpo::loss_bwd", mutates_args=())
def loss_bwd(logits: Tensor, tokens: Tensor, mask: Tensor, state: Tensor, grad_loss: Tensor, config: str) -> Tensor:
    from .torch_backend import two_pass_backward

    cfg = config_from_str(config)
    lse, gl, gh, ent = state.unbind(0)
    has_ent = cfg.needs_entropy and cfg.entropy_coef != 0
    return two_pass_backward(logits, tokens, mask, lse, gl, gh if has_ent else None, ent if has_ent else None,
                             grad_loss, cfg.temperature)


@loss_bwd.register_fake
def _(logits, tokens, mask, state, grad_loss, config):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, tokens, mask = inputs[0], inputs[1], inputs[2]
    lam = inputs[6]
    config = inputs[10]
    ctx.config = config
    ctx.fused = not config_from_str(config).ratio_trace
    ctx.lam_dtype = None if lam is None else lam.dtype
    ctx.save_for_backward(logits, tokens, mask, output[3], output[4])


def _backward(ctx, g_loss, g_metrics, g_seq_weight, g_dlam, g_state):
    # VJP: loss = L(logits, lam); the forward already holds dL/dlogits (fused) or the per-token
    # coefficients (two-pass), and dL/dlam; both scale linearly with the incoming g_loss.
    logits, tokens, mask, dlam, state = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0]:
        if ctx.fused:
            dlogits = state * g_loss.to(state.dtype)
        else:
            dlogits = loss_bwd(logits, tokens, mask, state, g_loss, ctx.config)
    dlam_out = None
    if ctx.lam_dtype is not None and ctx.needs_input_grad[6]:
        dlam_out = (g_loss * dlam).to(ctx.lam_dtype)
    return dlogits, None, None, None, None, None, dlam_out, None, None, None, None, None


torch.library.register_autograd("lambda_grpo::loss_fwd", _backward, setup_context=_setup_context)


def compiled_torch_loss(batch: Batch, cfg: LossConfig):
    """The torch backend through the custom ops (used while torch.compile traces)."""
    from .output import LossOutput

    need_grad = torch.is_grad_enabled() and batch.logits.requires_grad
    lam = batch.lam
    loss, metrics, seq_weight, _, _ = loss_fwd(
        batch.logits, batch.tokens, batch.mask, batch.advantages, batch.old_logp, batch.ref_logp, lam,
        batch.num_tokens, batch.num_sequences, batch.group_size, cfg.to_json(), bool(need_grad))
    names = metric_names(cfg, batch.ref_logp is not None)
    out = {k: metrics[i].detach() for i, k in enumerate(names)}
    out["seq_weight"] = seq_weight.detach()
    return LossOutput(loss, out)
