"""The op layer: the custom ops of the fast backends, their fake (shape) implementations and their
autograd, with two doors onto the same computation (lambda_grpo/_compute.py).

- compiled (torch.compile traces): the `torch.library` custom ops below, so that a compiled graph
  holds `lambda_grpo::loss_fwd` etc. with the engine as an argument (Triton kernels on CUDA);
- eager: a `torch.autograd.Function` per op that runs the op's own Python body, with the op's own
  `setup_context` and backward. The dispatcher wrapper of a custom op costs ~50 us per call on the
  host, several times the rest of a small step's host work (bench/host.py); the Function costs ~7.

The ops take a small fixed schema: the differentiable input(s), the Batch's tensors as one list
in the order of `lambda_grpo._batch.PARTS`, lambda, the config as a JSON string, the engine name and
`Flags` packed into a string. Only the loss carries a gradient; the other outputs (metrics,
seq_weight, dlam, grad, rows, per-token) are non-differentiable.

    lambda_grpo::loss_fwd(logits, parts, lam, config, engine, flags)
        -> (loss, metrics (K,), seq_weight (B,), dlam, grad, rows, per_token)
    lambda_grpo::loss_bwd(logits, tokens, mask, rows, grad_loss, config, engine) -> dlogits
    lambda_grpo::rows_fwd(logp, entropy, parts, lam, config, flags) -> (..., dlogp, dH, per_token)
    lambda_grpo::linear_fwd(hidden, weight, bias, parts, lam, config, engine, flags) -> (..., dh, dW, db, ...)
    lambda_grpo::logprobs_fwd / logprobs_bwd, linear_logprobs_fwd / linear_logprobs_bwd

Memory contract of the fused backward (what the default, inplace=False, guarantees):
- the saved buffer is the gradient for an upstream gradient g of 1 (loss.backward()): no copy. It
  is saved as a detached alias, not as the op's output: a saved output is kept as a separate
  tensor object that does not count as a reference, so autograd would let a leaf's AccumulateGrad
  take the saved buffer itself as `.grad` and a later backward would add into it (issue 8, finding
  3). The alias does count: with retain_graph=True the graph still holds it and AccumulateGrad
  copies; without retain_graph the engine releases saved tensors before AccumulateGrad runs, so
  the buffer is still handed over uncopied.
- g != 1 (`_upstream`): the torch engine reads g on the host and makes a new g * grad (the saved
  buffer stays intact); the Triton engine never reads g on the host: it rescales the buffer in
  place on the device, by g / (the scale it holds), a no-op for g == 1. A retained graph's second
  backward rescales it again, so a gradient returned by torch.autograd.grad with
  retain_graph=True is that buffer (clone it to keep it across another backward).
- compiled: g * grad; AOTAutograd donates the saved buffer to the backward, so inductor writes
  the product over it (same peak memory as eager; a second backward is refused by torch).
inplace=True (eager only): dlogits are written over the logits (fused: in the forward), g is
applied in place; the logits are destroyed and backward can run once.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._compute import (config_from_str, flags_from_str, linear_logprobs_backward_, linear_logprobs_forward,
                       linear_loss_forward, linear_loss_forward_fake, logprobs_backward, logprobs_forward,
                       loss_forward, loss_forward_fake, rows_forward, rows_forward_fake, two_pass_grad)
from ._batch import PART, compute_dtype, poisoned
from ._engine import engine


def _call(op, body):
    """The op under torch.compile (a backward traced into a graph needs it), else its body: the
    eager backward is not traced, and the dispatcher wrapper costs ~50 us of host time per call."""
    return op if torch.compiler.is_compiling() else body


def _doors(op, body, setup_context, backward):
    """(call): the custom op under torch.compile, else an autograd.Function running `body` (the
    op's implementation) with the op's own setup_context and backward."""

    class Eager(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            output = body(*inputs)
            setup_context(ctx, inputs, output)
            return output

        @staticmethod
        def backward(ctx, *grads):
            return backward(ctx, *grads)

    Eager.__name__ = Eager.__qualname__ = f"{body.__name__}_eager"

    def call(*inputs):
        if torch.compiler.is_compiling():
            return op(*inputs)
        return Eager.apply(*inputs)

    torch.library.register_autograd(op, backward, setup_context=setup_context)
    return call


# --------------------------------------------------------------------------------------------
# The loss from logits
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lambda_grpo::loss_fwd", mutates_args=())
def loss_fwd_op(logits: Tensor, parts: List[Optional[Tensor]], lam: Optional[Tensor], config: str, engine: str,
                flags: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return loss_forward(logits, parts, lam, config, engine, flags)


loss_fwd_op.register_fake(loss_forward_fake)


@torch.library.custom_op("lambda_grpo::loss_bwd", mutates_args=())
def loss_bwd(logits: Tensor, tokens: Tensor, mask: Tensor, rows: Tensor, grad_loss: Tensor, config: str,
             engine: str) -> Tensor:
    """The two-pass backward: dL/dlogits (B, T, V) = g * (softmax VJP of the saved coefficients)."""
    return _loss_bwd(logits, tokens, mask, rows, grad_loss, config, engine)


def _loss_bwd(logits, tokens, mask, rows, grad_loss, config, engine) -> Tensor:
    return two_pass_grad(logits, tokens, mask, rows, grad_loss, config, engine, None)


@loss_bwd.register_fake
def _(logits, tokens, mask, rows, grad_loss, config, engine):
    return torch.empty_like(logits)


@torch.library.custom_op("lambda_grpo::loss_bwd_inplace", mutates_args=("logits",))
def loss_bwd_inplace(logits: Tensor, tokens: Tensor, mask: Tensor, rows: Tensor, grad_loss: Tensor, config: str,
                     engine: str) -> None:
    """loss_bwd written over the logits (inplace_backward=True, eager only)."""
    _loss_bwd_inplace(logits, tokens, mask, rows, grad_loss, config, engine)


def _loss_bwd_inplace(logits, tokens, mask, rows, grad_loss, config, engine) -> None:
    if not logits.is_contiguous():
        raise ValueError("logits: expected a contiguous tensor for inplace_backward=True")
    two_pass_grad(logits, tokens, mask, rows, grad_loss, config, engine, logits.view(-1, logits.shape[-1]))


def _loss_setup(ctx, inputs, output):
    logits, parts, lam, config, eng, flags = inputs
    cfg, f = config_from_str(config), flags_from_str(flags)
    # Only the loss carries a gradient. set_materialize_grads(False): the backward reads only the
    # loss's gradient; otherwise autograd hands it a zero tensor for every other output, among
    # them `grad`: a new (B, T, V) buffer of zeros in every fused backward (measured: a second
    # 1.2 GB of page faults and a memset at N = 2048, V = 151 936).
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.config, ctx.engine, ctx.inplace = config, eng, f.inplace
    ctx.fused = f.need_grad and not cfg.row_coupled
    ctx.lam_meta = None if lam is None else (lam.dtype, lam.device)
    ctx.poison = parts[PART["poison"]]
    # the fused schedule's gradient takes the poison in the engine's scale_ (eager), if it can
    ctx.kernel_poison = ctx.fused and engine(eng).APPLIES_POISON
    ctx.used = False
    # the fused schedule keeps only its gradient: the logits may be freed after the forward
    # (unless they hold the gradient, inplace=True)
    keep_logits = f.need_grad and (f.inplace or not ctx.fused)
    grad = output[4].detach() if (ctx.fused and not f.inplace) else output[4]  # an alias: see the module docstring
    tokens, mask = parts[PART["vocab_tokens"]], parts[PART["vocab_mask"]]
    ctx.save_for_backward(logits if keep_logits else None, tokens, mask, output[3], grad, output[5])


def _upstream(ctx, d: Tensor, mask: Optional[Tensor], g: Tensor, poison: Optional[Tensor] = None) -> Tensor:
    """g * d for a saved gradient d computed for an upstream gradient of 1 (the module docstring's
    memory contract). Compiled: always the product (inductor writes it over the donated buffer).
    poison: the value rules' verdict for an engine that applies it in scale_ (else None)."""
    if torch.compiler.is_compiling() or type(g) is not torch.Tensor:
        return d * g.to(d.dtype)
    eng = engine(ctx.engine)
    if not eng.RESCALE_IN_PLACE:
        return d if bool(g == 1) else d * g.to(d.dtype)
    scales = ctx.scales if hasattr(ctx, "scales") else {}
    held = scales.get(id(d))
    factor = g if held is None else g / held
    rows = d.numel() // d.shape[-1] if d.dim() > 1 else d.numel()
    eng.scale_(d if d.dim() > 1 else d.view(-1, 1),
               mask if mask is not None else torch.ones(rows, dtype=torch.bool, device=d.device), factor, poison)
    scales[id(d)] = g  # the scale d now holds (nothing writes into g after the backward it was handed to)
    ctx.scales = scales
    return d


def _lam_grad(ctx, g_loss: Tensor, dlam: Tensor, index: int) -> Optional[Tensor]:
    if ctx.lam_meta is None or not ctx.needs_input_grad[index]:
        return None
    dtype, device = ctx.lam_meta
    return (g_loss * dlam).to(device=device, dtype=dtype)


def _loss_backward(ctx, g_loss, *unused):
    # VJP: loss = L(logits, lam) is linear in the per-token terms given the forward's state, so
    #   dL/dlogits = g * (saved dL/dlogits) (fused) or g * softmax-VJP(saved coefficients);
    #   dL/dlam = g * sum_i S_i df_i/dlam / max(1, N_tok) (f enters only through the weights).
    if g_loss is None:  # nothing flows back from the loss (grads are not materialised)
        return (None,) * 6
    if ctx.inplace:
        if ctx.used:
            raise RuntimeError("grpo_loss(inplace_backward=True): backward can run once (the gradient was "
                               "written over the logits); use inplace_backward=False to backward twice")
        ctx.used = True
    # the value rules' verdict: in the engine's scale_ (its dlam is NaN already), else here
    in_kernel = ctx.kernel_poison and not torch.compiler.is_compiling()
    if not in_kernel:
        g_loss = poisoned(g_loss, ctx.poison)
    poison = ctx.poison if in_kernel else None
    logits, tokens, mask, dlam, grad, rows = ctx.saved_tensors
    dlogits = None
    if ctx.needs_input_grad[0]:
        g = g_loss.detach() if g_loss.requires_grad else g_loss
        if ctx.fused and ctx.inplace:
            engine(ctx.engine).scale_(logits.view(-1, logits.shape[-1]), mask, g, poison)
            dlogits = logits.detach()  # a new tensor object over the logits' storage (see below)
        elif ctx.fused:
            dlogits = _upstream(ctx, grad, mask, g, poison)
        elif ctx.inplace:
            _call(torch.ops.lambda_grpo.loss_bwd_inplace, _loss_bwd_inplace)(logits, tokens, mask, rows, g, ctx.config,
                                                                             ctx.engine)
            # A new tensor object over the logits' storage: returning the saved logits themselves
            # (the caller's tensor, referenced by the caller) makes autograd copy the gradient
            # into a new buffer instead of taking it as .grad (AccumulateGrad steals only a
            # gradient nothing else references), which undoes inplace_backward. A leaf's .grad is
            # then the logits' own storage (docs/math.md §12).
            dlogits = logits.detach()
        else:
            dlogits = _call(torch.ops.lambda_grpo.loss_bwd, _loss_bwd)(logits, tokens, mask, rows, g, ctx.config,
                                                                      ctx.engine)
    return dlogits, None, _lam_grad(ctx, g_loss, dlam, 2), None, None, None


loss_fwd = _doors(loss_fwd_op, loss_forward, _loss_setup, _loss_backward)


# --------------------------------------------------------------------------------------------
# The loss from per-token log-probs: the row math alone (the caller's logp carry the gradient)
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lambda_grpo::rows_fwd", mutates_args=())
def rows_fwd_op(logp: Tensor, entropy: Optional[Tensor], parts: List[Optional[Tensor]], lam: Optional[Tensor],
                config: str, flags: str) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return rows_forward(logp, entropy, parts, lam, config, flags)


rows_fwd_op.register_fake(rows_forward_fake)


def _rows_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    logp, entropy, lam = inputs[0], inputs[1], inputs[3]
    ctx.poison = inputs[2][PART["poison"]]
    ctx.meta = [(x.dtype, x.device) if x is not None else None for x in (logp, entropy)]
    ctx.lam_meta = None if lam is None else (lam.dtype, lam.device)
    ctx.save_for_backward(output[3], output[4], output[5])


def _rows_backward(ctx, g_loss, *unused):
    # VJP: the forward holds dL/dlogp, dL/dH and dL/dlam in closed form (lambda_grpo/_rowmath.py);
    # each scales linearly with the upstream gradient g.
    if g_loss is None:
        return (None,) * 6
    g_loss = poisoned(g_loss, ctx.poison)
    dlam, dlogp, dH = ctx.saved_tensors
    (lp_dt, _), ent_meta = ctx.meta
    g = g_loss.detach()
    d_logp = d_ent = None
    if ctx.needs_input_grad[0]:
        d_logp = (g.to(dlogp.dtype) * dlogp).to(lp_dt)
    if ent_meta is not None and ctx.needs_input_grad[1]:
        d_ent = (g.to(dlogp.dtype) * dH if dH.numel() else torch.zeros_like(dlogp)).to(ent_meta[0])
    return d_logp, d_ent, None, _lam_grad(ctx, g_loss, dlam, 3), None, None


rows_fwd = _doors(rows_fwd_op, rows_forward, _rows_setup, _rows_backward)


# --------------------------------------------------------------------------------------------
# The loss from hidden states and the LM head (lambda_grpo/_linear.py): logits never exist
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lambda_grpo::linear_fwd", mutates_args=())
def linear_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], parts: List[Optional[Tensor]],
                  lam: Optional[Tensor], config: str, engine: str, flags: str
                  ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return linear_loss_forward(hidden, weight, bias, parts, lam, config, engine, flags)


linear_fwd_op.register_fake(linear_loss_forward_fake)


def _linear_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    lam = inputs[4]
    ctx.engine = inputs[6]
    ctx.poison = inputs[3][PART["poison"]]
    ctx.lam_meta = None if lam is None else (lam.dtype, lam.device)
    # the gradients as detached aliases, for the reason given in the module docstring
    ctx.save_for_backward(output[3], output[4].detach(), output[5].detach(), output[6].detach())


def _linear_backward(ctx, g_loss, *unused):
    # VJP: the forward holds dL/dhidden, dL/dW, dL/db and dL/dlam for g = 1; all are linear in g.
    if g_loss is None:
        return (None,) * 8
    g_loss = poisoned(g_loss, ctx.poison)
    dlam, dh, dw, db = ctx.saved_tensors
    g = g_loss.detach()
    d_h = _upstream(ctx, dh, None, g) if ctx.needs_input_grad[0] else None
    d_w = _upstream(ctx, dw, None, g) if ctx.needs_input_grad[1] else None
    d_b = _upstream(ctx, db, None, g) if (ctx.needs_input_grad[2] and db.numel()) else None
    return d_h, d_w, d_b, None, _lam_grad(ctx, g_loss, dlam, 4), None, None, None


linear_fwd = _doors(linear_fwd_op, linear_loss_forward, _linear_setup, _linear_backward)


# --------------------------------------------------------------------------------------------
# token_logprobs: log_softmax(logits / tau)[tokens], the same engines
# --------------------------------------------------------------------------------------------
@torch.library.custom_op("lambda_grpo::logprobs_fwd", mutates_args=())
def logprobs_fwd_op(logits: Tensor, tokens: Tensor, temperature: float, engine: str) -> Tuple[Tensor, Tensor]:
    return logprobs_forward(logits, tokens, temperature, engine)


@logprobs_fwd_op.register_fake
def _(logits, tokens, temperature, engine):
    B, T, V = logits.shape
    dtype = compute_dtype(logits.dtype)
    return logits.new_empty(B, T, dtype=dtype), logits.new_empty(2, B * T, dtype=dtype)


@torch.library.custom_op("lambda_grpo::logprobs_bwd", mutates_args=())
def logprobs_bwd(logits: Tensor, tokens: Tensor, lse: Tensor, grad: Tensor, temperature: float,
                 engine: str) -> Tensor:
    return logprobs_backward(logits, tokens, lse, grad, temperature, engine)


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
        d = _call(torch.ops.lambda_grpo.logprobs_bwd, logprobs_backward)(logits, tokens, lse, g_logp, ctx.temperature,
                                                                         ctx.engine)
    return d, None, None, None


logprobs_fwd = _doors(logprobs_fwd_op, logprobs_forward, _lp_setup, _lp_backward)


@torch.library.custom_op("lambda_grpo::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, temperature: float,
                           want_entropy: bool, engine: str) -> Tuple[Tensor, Tensor, Tensor]:
    """(logp (B, T), entropy (B, T) or empty, lse (2, B*T) = [max, log sum])."""
    return linear_logprobs_forward(hidden, weight, bias, tokens, temperature, want_entropy, engine)


@linear_logprobs_fwd_op.register_fake
def _(hidden, weight, bias, tokens, temperature, want_entropy, engine):
    B, T, _ = hidden.shape
    dtype = compute_dtype(hidden.dtype)
    ent = hidden.new_empty(B, T, dtype=dtype) if want_entropy else hidden.new_empty(0, dtype=dtype)
    return hidden.new_empty(B, T, dtype=dtype), ent, hidden.new_empty(2, B * T, dtype=dtype)


@torch.library.custom_op("lambda_grpo::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], tokens: Tensor, lse: Tensor,
                        ent: Tensor, g_logp: Tensor, g_ent: Optional[Tensor], temperature: float, engine: str
                        ) -> Tuple[Tensor, Tensor, Tensor]:
    return linear_logprobs_backward_(hidden, weight, bias, tokens, lse, ent, g_logp, g_ent, temperature, engine)


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, tokens, lse, ent, g_logp, g_ent, temperature, engine):
    db = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(hidden), torch.empty_like(weight), db


def _llp_setup(ctx, inputs, output):
    ctx.mark_non_differentiable(output[2])
    ctx.set_materialize_grads(False)
    hidden, weight, bias, tokens, temperature, want_entropy, eng = inputs
    ctx.temperature, ctx.engine, ctx.has_bias = temperature, eng, bias is not None
    ctx.save_for_backward(hidden, weight, bias, tokens, output[2], output[1])


def _llp_backward(ctx, g_logp, g_ent, g_lse):
    hidden, weight, bias, tokens, lse, ent = ctx.saved_tensors
    if g_logp is None and g_ent is None:
        return (None,) * 7
    if g_logp is None:
        g_logp = torch.zeros(hidden.shape[:2], dtype=lse.dtype, device=lse.device)
    dh, dw, db = _call(torch.ops.lambda_grpo.linear_logprobs_bwd, linear_logprobs_backward_)(
        hidden, weight, bias, tokens, lse, ent, g_logp, g_ent if ent.numel() else None, ctx.temperature, ctx.engine)
    return (dh if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None,
            db if (ctx.has_bias and ctx.needs_input_grad[2]) else None, None, None, None, None)


linear_logprobs_fwd = _doors(linear_logprobs_fwd_op, linear_logprobs_forward, _llp_setup, _llp_backward)
