"""EVERY use of lambda_grpo's private modules by the GPU check, in one place.

The rest of bench/gpu_check uses the public API (lambda_grpo.grpo_loss, fused_linear_grpo_loss,
grpo_loss_from_logprobs, LossConfig, GRPOLoss, backend=, inplace_backward=, cu_seqlens=) and the
test suite's tolerance rule (tests/_compare.py). What cannot be had from the public API is here,
so that a redesign of the internals (issue 17) is adapted in this file alone:

- `counting_engine`: counts the calls of the Triton engine's launchers (compile section: did the
  compiled graph run our Triton kernels?). Uses lambda_grpo._vocab_triton's module functions.
- `loss_op_nodes`: finds our custom op in a captured FX graph and the engine it was given
  (compile section). Knows the op's name (lambda_grpo::loss_fwd) and that the engine is a string
  argument.
- `row_pass_pair`: the Triton row kernel and the torch row math on the same validated batch
  (rows section). Uses lambda_grpo._validate.validate, lambda_grpo._rowmath.token_constants /
  row_pass and lambda_grpo._vocab_triton.row_pass.
- `OUR_KERNELS`: the names of our Triton kernels, as the CUDA profiler shows them
  (lambda_grpo/kernels/*.py).

Each function raises `InternalsChanged` with what it looked for when the internals moved; the
section then reports a FAIL naming this file, and the other sections run on.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Callable, Dict, List, Tuple

OUR_KERNELS = ("vocab_fused_kernel", "vocab_fwd_kernel", "vocab_bwd_kernel", "row_kernel", "scale_kernel",
               "group_weights_kernel", "finish_kernel", "finish_tokens_kernel")
# launchers of the Triton engine (lambda_grpo/_vocab_triton.py) that the custom ops look up at run time
ENGINE_LAUNCHERS = ("vocab_fused", "vocab_forward", "vocab_backward", "row_pass", "scale_", "finish_fused")
FUSED_LAUNCHERS = ("vocab_fused", "finish_fused")
TWO_PASS_LAUNCHERS = ("vocab_forward", "row_pass", "vocab_backward")
LOSS_OP = "lambda_grpo.loss_fwd"


class InternalsChanged(RuntimeError):
    """lambda_grpo's internals no longer look as bench/gpu_check/internals.py expects."""


@contextmanager
def counting_engine():
    """Count calls of the Triton engine's launchers (the custom ops look them up at run time)."""
    try:
        import lambda_grpo._vocab_triton as vt
    except ImportError as e:
        raise InternalsChanged(f"lambda_grpo._vocab_triton does not import ({e}); adapt "
                               "bench/gpu_check/internals.py:counting_engine") from e
    missing = [n for n in ENGINE_LAUNCHERS if not callable(getattr(vt, n, None))]
    if missing:
        raise InternalsChanged(f"lambda_grpo._vocab_triton has no {missing}; adapt "
                               "bench/gpu_check/internals.py:counting_engine")
    counts: Counter = Counter()
    saved = {}
    for name in ENGINE_LAUNCHERS:
        f = getattr(vt, name)
        saved[name] = f

        def wrapped(*a, _f=f, _n=name, **k):
            counts[_n] += 1
            return _f(*a, **k)

        setattr(vt, name, wrapped)
    try:
        yield counts
    finally:
        for name, f in saved.items():
            setattr(vt, name, f)


def loss_op_nodes(graphs) -> Tuple[int, List[str]]:
    """(number of our loss op's nodes, the engine arguments they carry) in captured FX graphs."""
    ops = [n for g in graphs for n in g.graph.nodes if n.op == "call_function" and LOSS_OP in str(n.target)]
    engines = [a for n in ops for a in list(n.args) + list(n.kwargs.values()) if a in ("triton", "torch")]
    return len(ops), engines


def row_pass_pair(logits, tokens, mask, adv, group_size: int, old, ref, lam, cfg, logp, ent
                  ) -> Dict[str, Callable[[], object]]:
    """{"triton": row kernel, "torch": torch row math}: each a closure computing the row pass of
    the same validated batch from given per-token logp and entropy; each returns an object with a
    `.loss` (the row pass's loss)."""
    try:
        import lambda_grpo._rowmath as rm
        import lambda_grpo._vocab_triton as vt
        from lambda_grpo._validate import validate
    except ImportError as e:
        raise InternalsChanged(f"{e}; adapt bench/gpu_check/internals.py:row_pass_pair") from e
    try:
        batch = validate(logits, tokens, mask, adv, group_size, old, ref, lam, cfg, None, None)
        consts = rm.token_constants(batch, cfg, logp.dtype)
    except TypeError as e:
        raise InternalsChanged(f"validate / token_constants changed their signature ({e}); adapt "
                               "bench/gpu_check/internals.py:row_pass_pair") from e
    return {"triton": lambda: vt.row_pass(logp, ent, batch, cfg, consts, want_coef=True),
            "torch": lambda: rm.row_pass(logp, ent, batch, cfg, consts)}
