"""The computation of the fast backends: what the custom ops run (lambda_grpo/_ops.py registers
them and their autograd; lambda_grpo/_entry.py calls them from the public functions).

Every function here takes the op's own arguments: a Batch's named tensors (`parts`, in the order of
lambda_grpo._batch.PARTS), the config as a JSON string and small flags as a string (constants of a
compiled graph: a new value of lambda, the advantages, the mask or the normalisers is new data,
never a recompilation), and an engine name (lambda_grpo/_engine.py).

Schedules of the loss from logits. fused (no row coupling, LossConfig.row_coupled; the logits need
a gradient): the forward writes `grad` = dL/dlogits for an upstream gradient of 1 while the softmax
is in cache, and the backward only applies the upstream gradient g. two-pass: the forward keeps
`rows` = [max, log sum, dL/dlogp, dL/dH, H] (5, N) and the backward recomputes the softmax once.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .config import LossConfig
from .output import metric_names
from ._batch import PART, Batch, as_dtype, compute_dtype, poisoned
from ._engine import engine
from ._linear import linear_forward, linear_logprobs, linear_logprobs_backward
from ._rowmath import PER_TOKEN_KEYS, FusedInputs, fused_inputs, broadcast_rows, row_pass, token_constants


@lru_cache(maxsize=64)
def config_from_str(s: str) -> LossConfig:
    return LossConfig(**json.loads(s))


class Flags(NamedTuple):
    """The small options of one op call, carried as one string argument (`Flags.pack`)."""

    group_size: int
    need_grad: bool  # the differentiable input needs a gradient (the fused schedule writes it)
    inplace: bool  # inplace_backward
    per_token: bool  # return_per_token
    head_grad: bool  # the LM head (weight, bias) needs a gradient (hidden-state route)
    # the engine's kernels check the counted token ids (Batch.ids_unchecked): the Batch's poison is
    # the one-element bool they set
    ids_in_kernels: bool = False

    def pack(self) -> str:
        return pack_flags(*self)


@lru_cache(maxsize=256)
def pack_flags(group_size, need_grad, inplace, per_token, head_grad, ids_in_kernels=False) -> str:
    """Flags(...).pack() of these fields."""
    bits = (need_grad, inplace, per_token, head_grad, ids_in_kernels)
    return f"{int(group_size)}:" + "".join(str(int(b)) for b in bits)


@lru_cache(maxsize=256)
def flags_from_str(s: str) -> Flags:
    g, bits = s.split(":")
    return Flags(int(g), *(c == "1" for c in bits))


def vocab_rows(logits: Tensor, eng) -> Tensor:
    """The logits as the engine's vocabulary functions take them: (B, T, V) as they are for an
    engine that reads batch and row strides (a slice such as logits[:, P-1:-1] is not copied, and
    the per-token inputs are indexed by (row, token)), else (N, V) (a view when the layout allows)."""
    return logits if (logits.dim() == 2 or eng.ROWS_3D) else logits.reshape(-1, logits.shape[-1])


def _empty(like: Tensor, dtype=None) -> Tensor:
    return like.new_empty(0, dtype=like.dtype if dtype is None else dtype)


# --------------------------------------------------------------------------------------------
# Outputs of a row pass, the same for every op
# --------------------------------------------------------------------------------------------
def row_outputs(rp, cfg: LossConfig, has_ref: bool, per_token: bool, like: Tensor, dtype):
    """(loss, metrics (K,) in metric_names order, seq_weight (B,), dlam, per-token (K', B, T) or empty)."""
    if rp.metric_vector is not None and rp.metric_vector.dtype == dtype:
        metrics = rp.metric_vector
    else:
        metrics = torch.stack([rp.metrics[k].to(dtype).reshape(()) for k in metric_names(cfg, has_ref)])
    dlam = as_dtype(rp.dlam, dtype) if rp.dlam is not None else torch.zeros((), dtype=dtype, device=like.device)
    toks = (torch.stack([rp.per_token[k].to(dtype) for k in PER_TOKEN_KEYS]) if per_token
            else _empty(like, dtype))
    return as_dtype(rp.loss, dtype), metrics, as_dtype(rp.metrics["seq_weight"], dtype), dlam, toks


def fake_row_outputs(cfg: LossConfig, has_ref: bool, per_token: bool, like: Tensor, B: int, T: int, dtype):
    k = len(metric_names(cfg, has_ref))
    toks = like.new_empty(len(PER_TOKEN_KEYS), B, T, dtype=dtype) if per_token else like.new_empty(0, dtype=dtype)
    return (like.new_empty((), dtype=dtype), like.new_empty(k, dtype=dtype), like.new_empty(B, dtype=dtype),
            like.new_empty((), dtype=dtype), toks)


# --------------------------------------------------------------------------------------------
# The loss from logits
# --------------------------------------------------------------------------------------------
def loss_forward(logits: Tensor, parts, lam: Optional[Tensor], config: str, engine_name: str, flags: str):
    """(loss, metrics, seq_weight, dlam, grad, rows, per_token) of lambda_grpo::loss_fwd."""
    cfg, f = config_from_str(config), flags_from_str(flags)
    batch = Batch.from_parts(parts, logits, lam, f.group_size)
    eng = engine(engine_name)
    V = logits.shape[-1]
    dtype = compute_dtype(logits.dtype)
    x2 = vocab_rows(logits, eng)
    tokens, mask = batch.vocab_tokens, batch.vocab_mask
    consts = token_constants(batch, cfg, dtype, eng.group_weights)
    tau = float(cfg.temperature)
    fused = f.need_grad and not cfg.row_coupled
    terms = None
    if fused:
        # a (B, T, V) base tensor, not a view, so that autograd can hand it on as .grad uncopied
        grad = _empty(logits) if f.inplace else torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        out = logits if f.inplace else grad  # (B, T, V) contiguous, or packed (N, V)
        out = out if eng.ROWS_3D else out.view(-1, V)
        fin = fused_inputs(consts, batch, dtype)
        if batch.packed_pos is not None:
            fin = FusedInputs(*(None if v is None else batch.to_vocab(broadcast_rows(v, fin.A)) for v in fin))
        kw = {}
        if eng.finish_fused is not None:  # the kernel also writes each token's terms: no row pass
            terms = kw["terms_out"] = torch.empty((4, *mask.shape), dtype=torch.float32, device=logits.device)
        if f.ids_in_kernels:
            kw["id_flag"] = batch.poison
        logp, ent, _ = eng.vocab_fused(x2, tokens, mask, tau, cfg.needs_entropy, fin, cfg, out=out, **kw)
        lse = None
    else:
        grad = _empty(logits)
        kw = {"id_flag": batch.poison} if f.ids_in_kernels else {}
        logp, ent, lse = eng.vocab_forward(x2, tokens, mask, tau, cfg.needs_entropy, want_lse=f.need_grad, **kw)
    if terms is not None:
        rp = eng.finish_fused(terms, ent, batch, cfg, consts, per_token=f.per_token)
    else:
        rp = eng.row_pass(batch.to_rows(logp), None if ent is None else batch.to_rows(ent), batch, cfg, consts,
                          per_token=f.per_token, want_coef=f.need_grad and not fused)
    if f.need_grad and not fused:
        z = torch.zeros(mask.numel(), dtype=dtype, device=logits.device)
        gh = z if rp.dentropy is None else as_dtype(batch.to_vocab(rp.dentropy), dtype)
        H = z if (rp.dentropy is None or ent is None) else as_dtype(ent, dtype).reshape(-1)
        rows = torch.cat([as_dtype(lse, dtype), torch.stack([as_dtype(batch.to_vocab(rp.dlogp), dtype), gh, H])])
    else:
        rows = _empty(logits, dtype)  # a tensor of its own: op outputs may not alias
    loss, metrics, seq_weight, dlam, toks = row_outputs(rp, cfg, batch.ref_logp is not None, f.per_token, logits,
                                                        dtype)
    return (loss if rp.poisoned else poisoned(loss, batch.poison)), metrics, seq_weight, dlam, grad, rows, toks


def loss_forward_fake(logits, parts, lam, config, engine_name, flags):
    cfg, f = config_from_str(config), flags_from_str(flags)
    B, T = parts[PART["mask"]].shape  # the row layout
    dtype = compute_dtype(logits.dtype)
    fused = f.need_grad and not cfg.row_coupled
    grad = logits.new_empty(logits.shape) if (fused and not f.inplace) else logits.new_empty(0)
    n_rows = logits.numel() // logits.shape[-1]  # B*T, or N packed
    rows = logits.new_empty(5, n_rows, dtype=dtype) if (f.need_grad and not fused) else logits.new_empty(0, dtype=dtype)
    loss, metrics, seq_weight, dlam, toks = fake_row_outputs(cfg, parts[PART["ref_logp"]] is not None, f.per_token,
                                                             logits, B, T, dtype)
    return loss, metrics, seq_weight, dlam, grad, rows, toks


def two_pass_grad(logits, tokens, mask, rows, grad_loss, config, engine_name, out):
    """dL/dlogits = g * softmax-VJP of the saved coefficients `rows` (the two-pass backward)."""
    cfg = config_from_str(config)
    m, log_s, gl, gh, H = rows.unbind()
    has_h = cfg.entropy_coef != 0 and cfg.needs_entropy
    eng = engine(engine_name)
    # tokens and mask in the vocabulary layout ((B, T) of a padded batch: the engines index them flat)
    d = eng.vocab_backward(vocab_rows(logits, eng), tokens, mask, (m, log_s), gl, gh if has_h else None,
                           H if has_h else None, float(cfg.temperature), grad_loss, out=out)
    return d if d.shape == logits.shape else d.view(logits.shape)


# --------------------------------------------------------------------------------------------
# The loss from per-token log-probs: the row math alone
# --------------------------------------------------------------------------------------------
def rows_forward(logp: Tensor, entropy: Optional[Tensor], parts, lam: Optional[Tensor], config: str, flags: str):
    """(loss, metrics, seq_weight, dlam, dL/dlogp (B, T), dL/dH (B, T) or empty, per-token)."""
    cfg, f = config_from_str(config), flags_from_str(flags)
    dtype = compute_dtype(logp.dtype)
    batch = Batch.from_parts(parts, None, lam, f.group_size)
    consts = token_constants(batch, cfg, dtype)
    ent = None if entropy is None else entropy.detach().to(dtype)
    rp = row_pass(logp.detach().to(dtype), ent, batch, cfg, consts, f.per_token)
    loss, metrics, seq_weight, dlam, toks = row_outputs(rp, cfg, batch.ref_logp is not None, f.per_token, logp, dtype)
    dH = _empty(logp, dtype) if rp.dentropy is None else rp.dentropy.to(dtype)
    return poisoned(loss, batch.poison), metrics, seq_weight, dlam, rp.dlogp.to(dtype), dH, toks


def rows_forward_fake(logp, entropy, parts, lam, config, flags):
    cfg, f = config_from_str(config), flags_from_str(flags)
    B, T = logp.shape
    dtype = compute_dtype(logp.dtype)
    loss, metrics, seq_weight, dlam, toks = fake_row_outputs(cfg, parts[PART["ref_logp"]] is not None, f.per_token,
                                                             logp, B, T, dtype)
    has_h = entropy is not None and cfg.entropy_coef != 0
    dH = logp.new_empty(B, T, dtype=dtype) if has_h else logp.new_empty(0, dtype=dtype)
    return loss, metrics, seq_weight, dlam, logp.new_empty(B, T, dtype=dtype), dH, toks


# --------------------------------------------------------------------------------------------
# The loss from hidden states and the LM head (lambda_grpo/_linear.py): logits never exist
# --------------------------------------------------------------------------------------------
def linear_loss_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], parts, lam: Optional[Tensor],
                        config: str, engine_name: str, flags: str):
    """(loss, metrics, seq_weight, dlam, dhidden, dweight, dbias, per-token); the three gradients
    for an upstream gradient of 1 (empty when not needed; dweight and dbias also when the head is
    frozen)."""
    cfg, f = config_from_str(config), flags_from_str(flags)
    batch = Batch.from_parts(parts, None, lam, f.group_size)
    rp, grads = linear_forward(hidden, weight, bias, batch, cfg, engine(engine_name), f.need_grad, f.per_token,
                               f.head_grad)
    dtype = compute_dtype(hidden.dtype)
    loss, metrics, seq_weight, dlam, toks = row_outputs(rp, cfg, batch.ref_logp is not None, f.per_token, hidden,
                                                        dtype)
    if grads is None:
        dh, dw, db = _empty(hidden), _empty(weight), _empty(weight)
    else:
        dh = grads.dhidden
        dw = _empty(weight) if grads.dweight is None else grads.dweight
        db = _empty(weight) if grads.dbias is None else grads.dbias
    return (loss if rp.poisoned else poisoned(loss, batch.poison)), metrics, seq_weight, dlam, dh, dw, db, toks


def linear_loss_forward_fake(hidden, weight, bias, parts, lam, config, engine_name, flags):
    cfg, f = config_from_str(config), flags_from_str(flags)
    B, T = parts[PART["mask"]].shape
    dtype = compute_dtype(hidden.dtype)
    loss, metrics, seq_weight, dlam, toks = fake_row_outputs(cfg, parts[PART["ref_logp"]] is not None, f.per_token,
                                                             hidden, B, T, dtype)
    dh = torch.empty_like(hidden) if f.need_grad else hidden.new_empty(0)
    dw = torch.empty_like(weight) if f.need_grad and f.head_grad else weight.new_empty(0)
    db = torch.empty_like(bias) if (f.need_grad and f.head_grad and bias is not None) else weight.new_empty(0)
    return loss, metrics, seq_weight, dlam, dh, dw, db, toks


# --------------------------------------------------------------------------------------------
# token_logprobs and linear_token_logprobs: log_softmax(logits / tau)[tokens], the same engines
# --------------------------------------------------------------------------------------------
def logprobs_forward(logits: Tensor, tokens: Tensor, temperature: float, engine_name: str):
    """(logp (B, T), lse (2, B*T)); tokens already clamped into [0, V)."""
    B, T, V = logits.shape
    mask = torch.ones(B * T, dtype=torch.bool, device=logits.device)
    eng = engine(engine_name)
    logp, _, lse = eng.vocab_forward(vocab_rows(logits, eng), tokens.reshape(-1), mask, float(temperature), False,
                                     want_lse=True)
    return logp.view(B, T), lse


def logprobs_backward(logits, tokens, lse, grad, temperature: float, engine_name: str) -> Tensor:
    # d logp_t / d logits_tj = (1[j = y_t] - p_tj) / tau, p recomputed from the saved lse
    B, T, V = logits.shape
    mask = torch.ones(B * T, dtype=torch.bool, device=logits.device)
    one = torch.ones((), dtype=lse.dtype, device=lse.device)
    eng = engine(engine_name)
    d = eng.vocab_backward(vocab_rows(logits, eng), tokens.reshape(-1), mask, lse,
                                           grad.reshape(-1).to(lse.dtype).contiguous(), None, None,
                                           float(temperature), one)
    return d.view(B, T, V)


def linear_logprobs_forward(hidden, weight, bias, tokens, temperature: float, want_entropy: bool, engine_name: str):
    """(logp (B, T), entropy (B, T) or empty, lse (2, B*T) = [max, log sum])."""
    logp, ent, lse = linear_logprobs(hidden, weight, bias, tokens, float(temperature), want_entropy,
                                     engine(engine_name))
    return logp, (ent if ent is not None else _empty(logp)), lse


def linear_logprobs_backward_(hidden, weight, bias, tokens, lse, ent, g_logp, g_ent, temperature: float,
                              engine_name: str):
    dh, dw, db = linear_logprobs_backward(hidden, weight, bias, tokens, lse, g_logp, g_ent,
                                          ent if g_ent is not None else None, float(temperature),
                                          engine(engine_name))
    return dh, dw, (db if db is not None else _empty(weight))
