"""What a quick (CI) run and a full run measure, in priority order.

A full run spends at most `--max-minutes`; cases are ordered so that the acceptance case
(V = 151 936, N = 2 048, fp32, fwd+bwd) is measured first, and whatever the budget cuts is
reported as skipped with that reason. Providers absent from a case's list are not run at that
shape because their time there would not fit the budget (the eager references cost 30-60 s per
fwd+bwd call at the largest shapes); the tables say so.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

from .cases import Case

# Ours next to the floor first, so that the two are measured under the same machine load.
ALL = ["floor", "torch", "eager_fp32", "trl", "reference", "compile_fp32", "triton", "liger_triton",
       "liger_chunked"]
FAST = ["floor", "torch", "eager_fp32", "trl", "compile_fp32", "triton", "liger_triton", "liger_chunked"]
CHEAP = ["floor", "torch", "compile_fp32", "triton", "liger_triton", "liger_chunked"]
# The hidden-states task: "floor" there is the three LM-head matmuls alone (bench/worker.py), then
# ours, Liger's chunked loss (the two the targets compare), then the others.
HIDDEN = ["floor", "fused_linear", "liger_chunked", "torch_linear", "trl_head", "verl_head"]

Entry = Tuple[Case, List[str]]

# SmolLM2-135M (the project's offline model) has V = 49 152 and hidden size 576.
HIDDEN_V, HIDDEN_H = 49152, 576


def quick() -> Tuple[List[Case], List[Entry]]:
    checks = [Case("logits", 32000, 256, "fp32", "grpo"), Case("logits", 32000, 256, "fp32", "lambda_trace"),
              Case("logits", 32000, 256, "bf16", "grpo"),
              Case("hidden", 32000, 256, "fp32", "grpo", H=64)]
    # Ours first: whatever the time budget cuts, the CI run has timed our backend and the floor.
    timed = [(Case("logits", 32000, 256, "fp32", "grpo"),
              ["floor", "torch", "eager_fp32", "reference", "trl", "compile_fp32", "triton", "liger_triton"]),
             (Case("logits", 32000, 512, "fp32", "grpo"), ["floor", "torch", "eager_fp32"]),
             (Case("hidden", 32000, 256, "fp32", "grpo", H=64), HIDDEN),
             (Case("logits", 32000, 256, "fp32", "lambda_trace"), ["torch", "eager_fp32"]),
             (Case("logits", 32000, 256, "bf16", "grpo"), ["torch", "eager_fp32", "trl"])]
    return checks, timed


def smoke() -> Tuple[List[Case], List[Entry]]:
    """A developer's pipeline test: two small N, a thread variant, the hidden task, few providers."""
    checks = [Case("logits", 32000, 128, "fp32", "grpo"), Case("hidden", 32000, 128, "fp32", "grpo", H=64)]
    timed = [(Case("logits", 32000, 256, "fp32", "grpo"), ["floor", "eager_fp32", "torch", "torch@1t"]),
             (Case("logits", 32000, 512, "fp32", "grpo"), ["floor", "eager_fp32", "torch", "torch@1t"]),
             (Case("hidden", 32000, 256, "fp32", "grpo", H=64), HIDDEN)]
    return checks, timed


def key() -> Tuple[List[Case], List[Entry]]:
    """Only the acceptance case (and its agreement check): to repeat it when the machine is quieter."""
    checks = [Case("logits", 151936, 128, "fp32", "grpo")]
    return checks, [(Case("logits", 151936, 2048, "fp32", "grpo"), ALL[:2] + ["torch@1t"] + ALL[2:])]


def cpu() -> Tuple[List[Case], List[Entry]]:
    """Issue 9, point 7: CPU speed in a real step, V = 151 936, N = 2 048, fp32, fwd+bwd, every
    call on a fresh gradient. The fused schedule (dapo: dlogits written by the forward) and the
    two-pass schedule (lambda_grpo with "both" ratio traces: the backward recomputes the
    softmax), each with and without inplace_backward, next to the floor measured in the same
    case, the eager reference and (dapo) TRL-style; then Liger's chunked loss, which starts from
    hidden states, in the hidden task at H = 64 (a small LM-head matmul: the loss dominates;
    the floor there is the three matmuls alone)."""
    checks = [Case("logits", 151936, 128, "fp32", "dapo"), Case("logits", 151936, 128, "fp32", "lambda_both"),
              Case("hidden", 151936, 128, "fp32", "dapo", H=64)]
    # "@1t" rows: the same with one intra-op thread, next to the floor with one thread. On this shared
    # 2-core machine other jobs make two-thread OpenMP regions (the floor's exp among them) wait on
    # each other; the one-thread ratios show the work alone.
    ours = ["floor", "torch", "torch_inplace", "floor@1t", "torch@1t", "torch_inplace@1t"]
    timed: List[Entry] = [
        (Case("logits", 151936, 2048, "fp32", "dapo"), ours + ["trl", "reference"]),
        (Case("logits", 151936, 2048, "fp32", "lambda_both"), ours + ["reference"]),
        (Case("hidden", 151936, 2048, "fp32", "dapo", H=64), ["floor", "fused_linear", "torch_linear",
                                                               "liger_chunked"]),
    ]
    return checks, timed


# Issue 10, point 6: the hidden-states job at these shapes, fp32, grpo, on the CPU.
HIDDEN_GRID_N = (2048, 4096)
HIDDEN_GRID_H = (576, 896)
HIDDEN_GRID_V = (49152, 151936)


def hidden() -> Tuple[List[Case], List[Entry]]:
    """Issue 10, point 6 (`--grid hidden`): from hidden states (B, T, H) and the LM head (V, H) to
    the GRPO loss and dhidden, dW, at N in {2 048, 4 096}, H in {576, 896}, V in {49 152,
    151 936}, fp32, mode grpo. In each case, in this order: the three-matmul floor (logits,
    dhidden, dW alone, over all N tokens and over the valid tokens only), ours
    (fused_linear_grpo_loss), Liger's LigerFusedLinearGRPOLoss, materialised logits + our
    grpo_loss, TRL 1.16's fused head + our grpo_loss_from_logprobs, verl's FusedLinearForPPO +
    grpo_loss_from_logprobs. Agreement is checked first at N = 128 for every (V, H). Cases run
    from the smallest to the largest."""
    checks = [Case("hidden", V, 128, "fp32", "grpo", H=H) for V in HIDDEN_GRID_V for H in HIDDEN_GRID_H]
    cases = [Case("hidden", V, N, "fp32", "grpo", H=H) for N in HIDDEN_GRID_N for V in HIDDEN_GRID_V
             for H in HIDDEN_GRID_H]
    cases.sort(key=lambda c: c.N * c.V * c.H)
    return checks, [(c, list(HIDDEN)) for c in cases]


def full() -> Tuple[List[Case], List[Entry]]:
    checks = [Case("logits", 32000, 128, dtype, mode) for dtype in ("fp32", "bf16")
              for mode in ("grpo", "dapo", "lambda_trace")]
    checks += [Case("logits", 151936, 128, "fp32", "grpo"), Case("logits", 151936, 128, "bf16", "grpo"),
               Case("logits", 151936, 128, "fp32", "lambda_trace"),
               Case("hidden", HIDDEN_V, 128, "fp32", "grpo", H=HIDDEN_H)]
    key = Case("logits", 151936, 2048, "fp32", "grpo")
    # "@1t": the same provider with one intra-op thread. On this shared 2-core machine other jobs
    # keep the cores busy, and two-thread OpenMP regions then wait on each other; the 1-thread rows
    # show how much of a provider's time is that contention (run for every provider at N = 512).
    one_thread = ["eager_fp32@1t", "trl@1t", "torch@1t"]
    timed: List[Entry] = [
        (key, ALL[:2] + ["torch@1t"] + ALL[2:]),
        (Case("logits", 151936, 512, "fp32", "grpo"), ALL[:2] + one_thread + ALL[2:]),
        (Case("logits", 151936, 2048, "bf16", "grpo"),
         ["floor", "eager_fp32", "trl", "torch", "torch@1t", "triton", "liger_triton", "compile_fp32"]),
        (Case("logits", 151936, 2048, "fp32", "lambda_trace"), ["eager_fp32", "torch", "torch@1t", "triton"]),
        (Case("logits", 32000, 2048, "fp32", "grpo"), ALL + ["torch@1t"]),
        (Case("logits", 32000, 512, "fp32", "grpo"), ALL + ["torch@1t"]),
        (Case("logits", 151936, 4096, "fp32", "grpo"), CHEAP + ["torch@1t"]),
        (Case("hidden", HIDDEN_V, 512, "fp32", "grpo", H=HIDDEN_H), HIDDEN),
        (Case("logits", 32000, 8192, "fp32", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 151936, 2048, "fp32", "dapo"), ["eager_fp32", "trl", "torch", "torch@1t", "triton"]),
        (Case("logits", 49152, 2048, "fp32", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 128256, 2048, "fp32", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 151936, 512, "bf16", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 49152, 8192, "fp32", "grpo"), CHEAP + ["torch@1t"]),
        (Case("hidden", HIDDEN_V, 2048, "fp32", "grpo", H=HIDDEN_H), HIDDEN),
    ]
    return checks, timed


def key_case(timed: List[Entry]) -> Optional[Case]:
    for case, _ in timed:
        if case.task == "logits" and case.V == 151936 and case.N == 2048 and case.dtype == "fp32" \
                and case.mode == "grpo":
            return case
    return None
