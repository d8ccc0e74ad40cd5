"""The one autograd path of the fast backends: torch.library custom ops over an engine.

Eager calls and torch.compile go through the same two ops (quack's shape: its
CrossEntropyFunction always calls its custom op), so there is one forward, one backward and
one way for metrics to leave:

    lambda_grpo::loss_fwd(logits, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens,
        num_sequences, group_size, config, engine, need_grad, inplace, per_token)
        -> (loss, metrics (K,), seq_weight (B,), dlam, grad, rows, per_token)
    lambda_grpo::loss_bwd(logits, tokens, mask, rows, grad_loss, config, engine) -> dlogits

`engine` names the module that computes ("torch": lambda_grpo/_vocab_torch.py, "triton":
lambda_grpo/_vocab_triton.py); both have the same interface. The config travels as a JSON
string (hashable, part of the graph), so a new hyper-parameter value is a new constant, never
new code; lambda, the advantages and the normalisers are runtime tensors (no recompilation).

Schedules. fused (no row coupling, see LossConfig.row_coupled; logits need a gradient): the
forward writes `grad` = dL/dlogits for an upstream gradient of 1 while the softmax is in cache; the backward
only applies the upstream gradient g. two-pass: the forward keeps `rows` = [max, log sum, dL/dlogp,
dL/dH, H] (5, B*T) and the backward recomputes the softmax once (`loss_bwd`).

Memory contract of the fused backward (what the default, inplace=False, guarantees):
- eager, g == 1 (loss.backward()): the saved buffer itself is the gradient, no copy; it is never
  written by backward, so backward may run again (retain_graph=True) and gives the same result.
  The buffer is saved as a detached alias, not as the op's output: a saved output is kept as a
  separate tensor object that does not count as a reference, so autograd would let a leaf's
  AccumulateGrad take the saved buffer itself as `.grad` and a later backward would add into it
  (issue 8, finding 3). The alias does count: with retain_graph=True the graph still holds it
  and AccumulateGrad copies (the leaf's `.grad` is then its own tensor); without retain_graph
  the engine releases saved tensors before AccumulateGrad runs, so the buffer is still handed
  over uncopied.
- eager, g != 1: a new buffer g * grad (the saved one stays intact).
- compiled: g * grad; AOTAutograd donates the saved buffer to the backward, so inductor writes
  the product over it (same peak memory as eager; a second backward is refused by torch).
inplace=True (eager only): dlogits are written over the logits (fused: in the forward), g is
applied in place; the logits are destroyed and backward can run once.
"""

from __future__ import annotations

import importlib
import json
from functools import lru_cache
from typing import Optional, Tuple

import torch
from torch import Tensor

from .config import LossConfig
from .output import LossOutput, metric_names
from ._batch import Batch, compute_dtype
from ._linear import linear_forward, linear_logprobs, linear_logprobs_backward
from ._packed import from_rows, row_layout, to_rows, vocab_layout
from ._rowmath import PER_TOKEN_KEYS, fused_inputs, row_pass, token_constants

ENGINES = {"torch": "lambda_grpo._vocab_torch", "triton": "lambda_grpo._vocab_triton"}


def engine_module(name: str):
    """The engine's module, imported on first use (the Triton one must import after
    TRITON_INTERPRET is set, so nothing imports it at package import time)."""
    return importlib.import_module(ENGINES[name])


@lru_cache(maxsize=64)
def config_from_str(s: str) -> LossConfig:
    return LossConfig(**json.loads(s))


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=like.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------------------------
# The computation (shared by the op implementation for every engine)
# --------------------------------------------------------------------------------------------
def _loss_forward(batch: Batch, cfg: LossConfig, eng, need_grad: bool, inplace: bool, per_token: bool,
                  pos: Optional[Tensor] = None):
    # pos (packed inputs, lambda_grpo/_packed.py): logits (N, V), tokens and mask (N,); the row math
    # runs on the (B, T) layout of the small tensors, the vocabulary passes on the packed rows
    logits = batch.logits
    V = logits.shape[-1]
    B, T = batch.advantages.shape
    dtype = compute_dtype(logits.dtype)
    x2 = logits.view(-1, V) if logits.is_contiguous() else logits.reshape(-1, V)
    tokens = batch.tokens.reshape(-1)
    mask = batch.mask.reshape(-1)
    batch = row_layout(batch, pos)
    consts = token_constants(batch, cfg, dtype)
    tau = float(cfg.temperature)
    fused = need_grad and not cfg.row_coupled
    grad, rows = _empty(logits), _empty(logits, dtype)  # two tensors: op outputs may not alias
    if fused:
        # a (B, T, V) base tensor, not a view, so that autograd can hand it on as .grad uncopied
        grad = _empty(logits) if inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        out = x2 if inplace else grad.view(-1, V)
        fin = fused_inputs(consts, batch, dtype)
        if pos is not None:
            fin = type(fin)(*(None if v is None else v.index_select(0, pos) for v in fin))
        logp, ent, _ = eng.vocab_fused(x2, tokens, mask, tau, cfg.needs_entropy, fin, cfg, out=out)
        lse = None
    else:
        logp, ent, lse = eng.vocab_forward(x2, tokens, mask, tau, cfg.needs_entropy, want_lse=need_grad)
    ent_bt = None if ent is None else to_rows(ent, pos, B, T)
    rp = eng.row_pass(to_rows(logp, pos, B, T), ent_bt, batch, cfg, consts, per_token=per_token,
                      want_coef=need_grad and not fused)
    if need_grad and not fused:
        z = torch.zeros(x2.shape[0], dtype=dtype, device=logits.device)
        gh = z if rp.dentropy is None else from_rows(rp.dentropy, pos).to(dtype)
        H = z if (rp.dentropy is None or ent is None) else ent.to(dtype)
        rows = torch.cat([lse.to(dtype), torch.stack([from_rows(rp.dlogp, pos).to(dtype), gh, H])])
    return rp, grad, rows


def _row_outputs(rp, cfg: LossConfig, has_ref: bool, per_token: bool, like: Tensor, dtype):
    """(loss, metrics (K,), seq_weight (B,), dlam, per-token (4, B, T) or empty) of a RowPass."""
    metrics = torch.stack([rp.metrics[k].to(dtype).reshape(()) for k in metric_names(cfg, has_ref)])
    dlam = rp.dlam.to(dtype) if rp.dlam is not None else torch.zeros((), dtype=dtype, device=like.device)
    toks = (torch.stack([rp.per_token[k].to(dtype) for k in PER_TOKEN_KEYS]) if per_token
            else _empty(like, dtype))
    return rp.loss.to(dtype).clone(), metrics, rp.metrics["seq_weight"].to(dtype).clone(), dlam.clone(), toks


def _fake_row_outputs(cfg: LossConfig, has_ref: bool, per_token: bool, like: Tensor, B: int, T: int, dtype):
    k = len(metric_names(cfg, has_ref))
    toks = like.new_empty(len(PER_TOKEN_KEYS), B, T, dtype=dtype) if per_token else like.new_empty(0, dtype=dtype)
    return (like.new_empty((), dtype=dtype), like.new_empty(k, dtype=dtype), like.new_empty(B, dtype=dtype),
            like.new_empty((), dtype=dtype), toks)


@torch.library.custom_op("lambda_grpo::loss_fwd", mutates_args=())
def loss_fwd(logits: Tensor, tokens: Tensor, mask: Tensor, advantages: Tensor, old_logp: Optional[Tensor],
             ref_logp: Optional[Tensor], lam: Optional[Tensor], num_tokens: Optional[Tensor],
             num_sequences: Optional[Tensor], group_size: int, group_lengths: Optional[Tensor],
             group_index: Optional[Tensor], token_weights: Optional[Tensor], config: str, engine: str,
             need_grad: bool, inplace: bool, per_token: bool, packed_pos: Optional[Tensor] = None
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    cfg = config_from_str(config)
    batch = Batch(logits, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size,
                  group_lengths, group_index, token_weights)
    rp, grad, rows = _loss_forward(batch, cfg, engine_module(engine), need_grad, inplace, per_token, packed_pos)
    loss, metrics, seq_weight, dlam, toks = _row_outputs(rp, cfg, ref_logp is not None, per_token, logits,
                                                         compute_dtype(logits.dtype))
    return loss, metrics, seq_weight, dlam, grad, rows, toks


@loss_fwd.register_fake
def _(logits, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size,
      group_lengths, group_index, token_weights, config, engine, need_grad, inplace, per_token, packed_pos=None):
    cfg = config_from_str(config)
    B, T = advantages.shape
    dtype = compute_dtype(logits.dtype)
    fused = need_grad and not cfg.row_coupled
    grad = logits.new_empty(logits.shape) if (fused and not inplace) else logits.new_empty(0)
    n_rows = logits.numel() // logits.shape[-1]  # B*T, or N packed
    rows = logits.new_empty(5, n_rows, dtype=dtype) if (need_grad and not fused) else logits.new_empty(0, dtype=dtype)
    loss, metrics, seq_weight, dlam, toks = _fake_row_outputs(cfg, ref_logp is not None, per_token, logits, B, T, dtype)
    return loss, metrics, seq_weight, dlam, grad, rows, toks


def _two_pass_grad(logits, tokens, mask, rows, grad_loss, config, engine, out):
    cfg = config_from_str(config)
    V = logits.shape[-1]  # (B, T, V), or (N, V) packed
    lse, gl, gh, H = rows[:2], rows[2], rows[3], rows[4]
    has_h = cfg.entropy_coef != 0 and cfg.needs_entropy
    x2 = logits.view(-1, V) if logits.is_contiguous() else logits.reshape(-1, V)
    d = engine_module(engine).vocab_backward(x2, tokens.reshape(-1), mask.reshape(-1), lse, gl,
                                             gh if has_h else None, H if has_h else None, float(cfg.temperature),
                                             grad_loss, out=out)
    return d.view(logits.shape)


@torch.library.custom_op("lambda_grpo::loss_bwd", mutates_args=())
def loss_bwd(logits: Tensor, tokens: Tensor, mask: Tensor, rows: Tensor, grad_loss: Tensor, config: str,
             engine: str) -> Tensor:
    """The two-pass backward: dL/dlogits (B, T, V) = g * (softmax VJP of the saved coefficients)."""
    return _two_pass_grad(logits, tokens, mask, rows, grad_loss, config, engine, None)


@loss_bwd.register_fake
def _(logits, tokens, mask, rows, grad_loss, config, engine):
    return torch.empty_like(logits)


@torch.library.custom_op("lambda_grpo::loss_bwd_inplace", mutates_args=("logits",))
def loss_bwd_inplace(logits: Tensor, tokens: Tensor, mask: Tensor, rows: Tensor, grad_loss: Tensor, config: str,
                     engine: str) -> None:
    """loss_bwd written over the logits (inplace_backward=True, eager only)."""
    if not logits.is_contiguous():
        raise ValueError("logits: expected a contiguous tensor for inplace_backward=True")
    _two_pass_grad(logits, tokens, mask, rows, grad_loss, config, engine, logits.view(-1, logits.shape[-1]))


def _setup_context(ctx, inputs, output):
    logits, tokens, mask = inputs[0], inputs[1], inputs[2]
    lam, config, engine, need_grad, inplace = inputs[6], inputs[13], inputs[14], inputs[15], inputs[16]
    cfg = config_from_str(config)
    # Only the loss carries a gradient. Without this, autograd would materialise zeros for the
    # other outputs' gradients in eager mode, a (B, T, V) buffer for `grad` among them.
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.config, ctx.engine, ctx.inplace = config, engine, inplace
    ctx.fused = need_grad and not cfg.row_coupled
    ctx.lam_meta = None if lam is None else (lam.dtype, lam.device)
    ctx.used = False
    # The backward reads only the loss's gradient. Without this, autograd hands it a zero tensor
    # for every other output, among them `grad`: a new (B, T, V) buffer of zeros in every
    # backward of the fused schedule (measured: a second 1.2 GB of page faults and a memset at
    # N = 2048, V = 151 936).
    ctx.set_materialize_grads(False)
    # the fused schedule keeps only its gradient: the logits may be freed after the forward
    # (unless they hold the gradient, inplace=True)
    keep_logits = need_grad and (inplace or not ctx.fused)
    grad = output[4].detach() if (ctx.fused and not inplace) else output[4]  # an alias: see the module docstring
    ctx.save_for_backward(logits if keep_logits else None, tokens, mask, output[3], grad, output[5])


def _fused_grad(ctx, d: Tensor, mask: Tensor, g: Tensor) -> Tensor:
    """Apply the upstream gradient g to the fused schedule's saved dL/dlogits (see the module
    docstring for the memory contract)."""
    if ctx.inplace:
        engine_module(ctx.engine).scale_(d.view(-1, d.shape[-1]), mask.reshape(-1), g)
        return d.detach()  # see _backward: a new tensor object over the logits' storage
    return _upstream(ctx, d, mask.reshape(-1), g)


def _upstream(ctx, d: Tensor, mask: Optional[Tensor], g: Tensor) -> Tensor:
    """g * d for a saved gradient d computed for an upstream gradient of 1 (see the module docstring).

    The engine decides how, by `engine.REREAD_UPSTREAM`: the torch engine reads g on the host and
    returns d itself when g == 1, else a new g * d (d never changes); the Triton engine never reads
    g on the host (no synchronisation): its kernel rescales d in place by g / (the scale d holds),
    a no-op when they are equal (the usual loss.backward()), so d holds g * dL/dx afterwards. With
    a retained graph a later backward with another g rescales it again in place: a gradient
    returned by torch.autograd.grad is then the same buffer (a leaf's .grad is a copy, as autograd
    copies what the graph still holds). Compiled: always the product (inductor writes it over the
    donated buffer)."""
    if torch.compiler.is_compiling() or type(g) is not torch.Tensor:
        return d * g.to(d.dtype)
    eng = engine_module(ctx.engine)
    if not eng.RESCALE_IN_PLACE:
        return d if bool(g == 1) else d * g.to(d.dtype)
    scales = ctx.scales if hasattr(ctx, "scales") else {}
    held = scales.get(id(d))
    factor = g if held is None else g / held
    d2 = d.view(-1, d.shape[-1]) if d.dim() > 1 else d.view(-1, 1)
    eng.scale_(d2, mask if mask is not None else torch.ones(d2.shape[0], dtype=torch.bool, device=d.device), factor)
    scales[id(d)] = g.detach().clone()
    ctx.scales = scales
    return d


def _backward(ctx, g_loss, g_metrics, g_seq_weight, g_dlam, g_grad, g_rows, g_tokens):
    # VJP: loss = L(logits, lam) is linear in the per-token terms given the forward's state, so
    #   dL/dlogits = g * (saved dL/dlogits) (fused) or g * softmax-VJP(saved coefficients);
    #   dL/dlam = g * sum_i S_i df_i/dlam / max(1, N_tok) (f enters only through the weights).
    if g_loss is None:  # nothing flows back from the loss (grads are not materialised)
        return (None,) * 19
    if ctx.inplace:
        if ctx.used:
            raise RuntimeError("grpo_loss(inplace_backward=True): backward can run once (the gradient was "
                               "written over the logits); use inplace_backward=False to backward twice")
        ctx.used = True
    logits, tokens, mask, dlam, grad, rows = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0]:
        g = g_loss.detach()
        if ctx.fused:
            dlogits = _fused_grad(ctx, logits if ctx.inplace else grad, mask, g)
        elif ctx.inplace:
            torch.ops.lambda_grpo.loss_bwd_inplace(logits, tokens, mask, rows, g, ctx.config, ctx.engine)
            # A new tensor object over the logits' storage: returning the saved logits themselves
            # (the caller's tensor, referenced by the caller) makes autograd copy the gradient
            # into a new buffer instead of taking it as .grad (AccumulateGrad steals only a
            # gradient nothing else references), which undoes inplace_backward.
            dlogits = logits.detach()
        else:
            dlogits = torch.ops.lambda_grpo.loss_bwd(logits, tokens, mask, rows, g, ctx.config, ctx.engine)
    dlam_out = None
    if ctx.lam_meta is not None and ctx.needs_input_grad[6]:
        dtype, device = ctx.lam_meta
        dlam_out = (g_loss * dlam).to(device=device, dtype=dtype)
    return (dlogits,) + (None,) * 5 + (dlam_out,) + (None,) * 12


torch.library.register_autograd("lambda_grpo::loss_fwd", _backward, setup_context=_setup_context)


def fast_loss(batch: Batch, cfg: LossConfig, engine: str, inplace: bool = False, per_token: bool = False) -> LossOutput:
    """The loss of a validated batch on a fast engine ("torch" or "triton"), eager or compiled."""
    need_grad = torch.is_grad_enabled() and batch.logits.requires_grad
    lam = batch.lam if cfg.uses_lambda else None
    # packed: tokens and mask go in the layout of the logits rows (N,), the rest in (B, T)
    tokens, mask = (batch.tokens, batch.mask) if batch.packed_pos is None else vocab_layout(batch)
    loss, metrics, seq_weight, _, _, _, toks = torch.ops.lambda_grpo.loss_fwd(
        batch.logits, tokens, mask, batch.advantages, batch.old_logp, batch.ref_logp, lam,
        batch.num_tokens, batch.num_sequences, batch.group_size, batch.group_lengths, batch.group_index,
        batch.token_weights, cfg.to_json(), engine, bool(need_grad), bool(inplace and need_grad), bool(per_token),
        batch.packed_pos)
    return _loss_output(loss, metrics, seq_weight, toks, cfg, batch.ref_logp is not None, per_token)


def _loss_output(loss, metrics, seq_weight, toks, cfg: LossConfig, has_ref: bool, per_token: bool) -> LossOutput:
    out = {k: metrics[i].detach() for i, k in enumerate(metric_names(cfg, has_ref))}
    out["seq_weight"] = seq_weight.detach()
    tokens = {k: toks[i].detach() for i, k in enumerate(PER_TOKEN_KEYS)} if per_token else None
    return LossOutput(loss, out, tokens)


# --------------------------------------------------------------------------------------------
# The loss from per-token log-probs: the row math alone (the caller's logp carry the gradient)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lambda_grpo::rows_fwd", mutates_args=())
def rows_fwd(logp: Tensor, entropy: Optional[Tensor], mask: Tensor, advantages: Tensor, old_logp: Optional[Tensor],
             ref_logp: Optional[Tensor], lam: Optional[Tensor], num_tokens: Optional[Tensor],
             num_sequences: Optional[Tensor], group_size: int, group_lengths: Optional[Tensor],
             group_index: Optional[Tensor], token_weights: Optional[Tensor], config: str, per_token: bool
             ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, metrics, seq_weight, dlam, dL/dlogp (B, T), dL/dH (B, T) or empty, per-token)."""
    cfg = config_from_str(config)
    dtype = compute_dtype(logp.dtype)
    tokens = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
    batch = Batch(None, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size,
                  group_lengths, group_index, token_weights)
    consts = token_constants(batch, cfg, dtype)
    ent = None if entropy is None else entropy.detach().to(dtype)
    rp = row_pass(logp.detach().to(dtype), ent, batch, cfg, consts, per_token)
    loss, metrics, seq_weight, dlam, toks = _row_outputs(rp, cfg, ref_logp is not None, per_token, logp, dtype)
    dH = _empty(logp, dtype) if rp.dentropy is None else rp.dentropy.to(dtype)
    return loss, metrics, seq_weight, dlam, rp.dlogp.to(dtype), dH, toks


@rows_fwd.register_fake
def _(logp, entropy, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size,
      group_lengths, group_index, token_weights, config, per_token):
    cfg = config_from_str(config)
    B, T = logp.shape
    dtype = compute_dtype(logp.dtype)
    loss, metrics, seq_weight, dlam, toks = _fake_row_outputs(cfg, ref_logp is not None, per_token, logp, B, T, dtype)
    has_h = entropy is not None and cfg.entropy_coef != 0
    dH = logp.new_empty(B, T, dtype=dtype) if has_h else logp.new_empty(0, dtype=dtype)
    return loss, metrics, seq_weight, dlam, logp.new_empty(B, T, dtype=dtype), dH, toks


def _rows_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    logp, entropy, lam = inputs[0], inputs[1], inputs[6]
    ctx.meta = [(x.dtype, x.device) if x is not None else None for x in (logp, entropy, lam)]
    ctx.save_for_backward(output[3], output[4], output[5])


def _rows_backward(ctx, g_loss, *unused):
    # VJP: the forward holds dL/dlogp, dL/dH and dL/dlam in closed form (lambda_grpo/_rowmath.py);
    # each scales linearly with the upstream gradient g.
    dlam, dlogp, dH = ctx.saved_tensors
    grads = [None] * 15
    if g_loss is None:
        return tuple(grads)
    (lp_dt, lp_dev), ent_meta, lam_meta = ctx.meta
    g = g_loss.detach()
    if ctx.needs_input_grad[0]:
        grads[0] = (g.to(dlogp.dtype) * dlogp).to(lp_dt)
    if ent_meta is not None and ctx.needs_input_grad[1]:
        dH_g = g.to(dlogp.dtype) * dH if dH.numel() else torch.zeros_like(dlogp)  # dH empty: no entropy term
        grads[1] = dH_g.to(ent_meta[0])
    if lam_meta is not None and ctx.needs_input_grad[6]:
        grads[6] = (g * dlam).to(device=lam_meta[1], dtype=lam_meta[0])
    return tuple(grads)


torch.library.register_autograd("lambda_grpo::rows_fwd", _rows_backward, setup_context=_rows_setup)


def rows_loss(logp: Tensor, entropy: Optional[Tensor], batch: Batch, cfg: LossConfig, per_token: bool = False
              ) -> LossOutput:
    """The loss of a validated batch from per-token log-probs (and entropies), eager or compiled."""
    lam = batch.lam if cfg.uses_lambda else None
    loss, metrics, seq_weight, _, _, _, toks = torch.ops.lambda_grpo.rows_fwd(
        logp, entropy, batch.mask, batch.advantages, batch.old_logp, batch.ref_logp, lam, batch.num_tokens,
        batch.num_sequences, batch.group_size, batch.group_lengths, batch.group_index, batch.token_weights,
        cfg.to_json(), bool(per_token))
    return _loss_output(loss, metrics, seq_weight, toks, cfg, batch.ref_logp is not None, per_token)


# --------------------------------------------------------------------------------------------
# token_logprobs: log_softmax(logits / tau)[tokens], the same engines
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lambda_grpo::logprobs_fwd", mutates_args=())
def logprobs_fwd(logits: Tensor, tokens: Tensor, temperature: float, engine: str) -> Tuple[Tensor, Tensor]:
    B, T, V = logits.shape
    x2 = logits.reshape(B * T, V)
    mask = torch.ones(B * T, dtype=torch.bool, device=logits.device)
    logp, _, lse = engine_module(engine).vocab_forward(x2, tokens.reshape(-1).clamp(0, max(V - 1, 0)), mask,
                                                       float(temperature), False, want_lse=True)
    return logp.view(B, T), lse


@logprobs_fwd.register_fake
def _(logits, tokens, temperature, engine):
    B, T, V = logits.shape
    dtype = compute_dtype(logits.dtype)
    return logits.new_empty(B, T, dtype=dtype), logits.new_empty(2, B * T, dtype=dtype)


@torch.library.custom_op("lambda_grpo::logprobs_bwd", mutates_args=())
def logprobs_bwd(logits: Tensor, tokens: Tensor, lse: Tensor, grad: Tensor, temperature: float,
                 engine: str) -> Tensor:
    # d logp_t / d logits_tj = (1[j = y_t] - p_tj) / tau, p recomputed from the saved lse
    B, T, V = logits.shape
    mask = torch.ones(B * T, dtype=torch.bool, device=logits.device)
    one = torch.ones((), dtype=lse.dtype, device=lse.device)
    d = engine_module(engine).vocab_backward(logits.reshape(B * T, V), tokens.reshape(-1).clamp(0, max(V - 1, 0)),
                                             mask, lse, grad.reshape(-1).to(lse.dtype).contiguous(), None, None,
                                             float(temperature), one)
    return d.view(B, T, V)


@logprobs_bwd.register_fake
def _(logits, tokens, lse, grad, temperature, engine):
    return torch.empty_like(logits)


def _lp_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.temperature, ctx.engine = inputs[2], inputs[3]
    ctx.save_for_backward(inputs[0], inputs[1], output[1])


def _lp_backward(ctx, g_logp, g_lse):
    logits, tokens, lse = ctx.saved_tensors
    d = None
    if ctx.needs_input_grad[0] and g_logp is not None:
        d = torch.ops.lambda_grpo.logprobs_bwd(logits, tokens, lse, g_logp, ctx.temperature, ctx.engine)
    return d, None, None, None


torch.library.register_autograd("lambda_grpo::logprobs_fwd", _lp_backward, setup_context=_lp_setup)


def fast_token_logprobs(logits: Tensor, tokens: Tensor, temperature: float, engine: str) -> Tensor:
    return torch.ops.lambda_grpo.logprobs_fwd(logits, tokens.long(), float(temperature), engine)[0]


# --------------------------------------------------------------------------------------------
# From hidden states and the LM head (fused linear, lambda_grpo/_linear.py): logits never exist
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lambda_grpo::linear_fwd", mutates_args=())
def linear_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, mask: Tensor,
               advantages: Tensor, old_logp: Optional[Tensor], ref_logp: Optional[Tensor], lam: Optional[Tensor],
               num_tokens: Optional[Tensor], num_sequences: Optional[Tensor], group_size: int,
               group_lengths: Optional[Tensor], group_index: Optional[Tensor], token_weights: Optional[Tensor],
               config: str, engine: str, need_grad: bool, per_token: bool, head_grad: bool,
               packed_pos: Optional[Tensor] = None
               ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, metrics, seq_weight, dlam, dhidden, dweight, dbias, per-token); the three gradients
    for an upstream gradient of 1 (empty when not needed; dweight and dbias also when head_grad
    is False: a frozen LM head)."""
    cfg = config_from_str(config)
    batch = Batch(None, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size,
                  group_lengths, group_index, token_weights)
    rp, grads = linear_forward(hidden, weight, bias, batch, cfg, engine_module(engine), need_grad, per_token,
                               head_grad, packed_pos)
    dtype = compute_dtype(hidden.dtype)
    loss, metrics, seq_weight, dlam, toks = _row_outputs(rp, cfg, ref_logp is not None, per_token, hidden, dtype)
    if grads is None:
        dh, dw, db = _empty(hidden), _empty(weight), _empty(weight)
    else:
        dh = grads.dhidden
        dw = _empty(weight) if grads.dweight is None else grads.dweight
        db = _empty(weight) if grads.dbias is None else grads.dbias
    return loss, metrics, seq_weight, dlam, dh, dw, db, toks


@linear_fwd.register_fake
def _(hidden, weight, bias, tokens, mask, advantages, old_logp, ref_logp, lam, num_tokens, num_sequences, group_size,
      group_lengths, group_index, token_weights, config, engine, need_grad, per_token, head_grad, packed_pos=None):
    cfg = config_from_str(config)
    B, T = advantages.shape
    dtype = compute_dtype(hidden.dtype)
    loss, metrics, seq_weight, dlam, toks = _fake_row_outputs(cfg, ref_logp is not None, per_token, hidden, B, T, dtype)
    dh = torch.empty_like(hidden) if need_grad else hidden.new_empty(0)
    dw = torch.empty_like(weight) if need_grad and head_grad else weight.new_empty(0)
    db = torch.empty_like(bias) if (need_grad and head_grad and bias is not None) else weight.new_empty(0)
    return loss, metrics, seq_weight, dlam, dh, dw, db, toks


def _linear_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    lam = inputs[8]
    ctx.engine = inputs[16]
    ctx.lam_meta = None if lam is None else (lam.dtype, lam.device)
    # the gradients as detached aliases, for the reason given in the module docstring
    ctx.save_for_backward(output[3], output[4].detach(), output[5].detach(), output[6].detach())


def _linear_backward(ctx, g_loss, *unused):
    # VJP: the forward holds dL/dhidden, dL/dW, dL/db and dL/dlam for g = 1; all are linear in g.
    dlam, dh, dw, db = ctx.saved_tensors
    grads = [None] * 21
    if g_loss is None:
        return tuple(grads)
    g = g_loss.detach()
    if ctx.needs_input_grad[0]:
        grads[0] = _upstream(ctx, dh, None, g)
    if ctx.needs_input_grad[1]:
        grads[1] = _upstream(ctx, dw, None, g)
    if ctx.needs_input_grad[2] and db.numel():
        grads[2] = _upstream(ctx, db, None, g)
    if ctx.lam_meta is not None and ctx.needs_input_grad[8]:
        grads[8] = (g * dlam).to(device=ctx.lam_meta[1], dtype=ctx.lam_meta[0])
    return tuple(grads)


torch.library.register_autograd("lambda_grpo::linear_fwd", _linear_backward, setup_context=_linear_setup)


def linear_loss(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], batch: Batch, cfg: LossConfig, engine: str,
                per_token: bool = False) -> LossOutput:
    """The loss of a validated batch from hidden states (B, T, H) and the LM head (V, H)."""
    need_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    # a frozen LM head (e.g. only the top layers trained, or LoRA): no dW / db buffer, no dW matmul
    head_grad = need_grad and any(t is not None and t.requires_grad for t in (weight, bias))
    lam = batch.lam if cfg.uses_lambda else None
    tokens, mask = (batch.tokens, batch.mask) if batch.packed_pos is None else vocab_layout(batch)
    loss, metrics, seq_weight, _, _, _, _, toks = torch.ops.lambda_grpo.linear_fwd(
        hidden, weight, bias, tokens, mask, batch.advantages, batch.old_logp, batch.ref_logp, lam,
        batch.num_tokens, batch.num_sequences, batch.group_size, batch.group_lengths, batch.group_index,
        batch.token_weights, cfg.to_json(), engine, bool(need_grad), bool(per_token), bool(head_grad),
        batch.packed_pos)
    return _loss_output(loss, metrics, seq_weight, toks, cfg, batch.ref_logp is not None, per_token)


@torch.library.custom_op("lambda_grpo::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, temperature: float,
                        want_entropy: bool, engine: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp (B, T), entropy (B, T) or empty, lse (2, B*T) = [max, log sum])."""
    logp, ent, lse = linear_logprobs(hidden, weight, bias, tokens, float(temperature), want_entropy,
                                     engine_module(engine))
    return logp, (ent if ent is not None else _empty(logp)), lse


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, tokens, temperature, want_entropy, engine):
    B, T, _ = hidden.shape
    dtype = compute_dtype(hidden.dtype)
    ent = hidden.new_empty(B, T, dtype=dtype) if want_entropy else hidden.new_empty(0, dtype=dtype)
    return hidden.new_empty(B, T, dtype=dtype), ent, hidden.new_empty(2, B * T, dtype=dtype)


@torch.library.custom_op("lambda_grpo::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, lse: Tensor,
                        ent: Tensor, g_logp: Tensor, g_ent: Optional[Tensor], temperature: float, engine: str
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    dh, dw, db = linear_logprobs_backward(hidden, weight, bias, tokens, lse, g_logp, g_ent,
                                          ent if g_ent is not None else None, float(temperature),
                                          engine_module(engine))
    return dh, dw, (db if db is not None else _empty(weight))


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, tokens, lse, ent, g_logp, g_ent, temperature, engine):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _llp_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    hidden, weight, bias, tokens, temperature, want_entropy, engine = inputs
    ctx.temperature, ctx.engine, ctx.has_bias = temperature, engine, bias is not None
    ctx.save_for_backward(hidden, weight, bias, tokens, output[2], output[1])


def _llp_backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return (None,) * 7
    if g_logp is None:
        g_logp = torch.zeros(hidden.shape[:2], dtype=lse.dtype, device=lse.device)
    dh, dw, db = torch.ops.lambda_grpo.linear_logprobs_bwd(hidden, weight, bias, tokens, lse, ent, g_logp,
                                                           g_ent if ent.numel() else None, ctx.temperature,
                                                           ctx.engine)
    return (dh if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
            db if (ctx.has_bias and ctx.needs_input_grad[2]) else None, None, None, None, None)


torch.library.register_autograd("lambda_grpo::linear_logprobs_fwd", _llp_backward, setup_context=_llp_setup)


def fast_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, temperature: float,
                         want_entropy: bool, engine: str):
    logp, ent, _ = torch.ops.lambda_grpo.linear_logprobs_fwd(hidden, weight, bias, tokens.long(), float(temperature),
                                                            bool(want_entropy), engine)
    return logp, (ent if want_entropy else None)
