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
LINEAR = ["liger_chunked", "torch_linear", "lm_head_matmul"]

Entry = Tuple[Case, List[str]]

# SmolLM2-135M (the project's offline model) has V = 49 152 and hidden size 576.
LINEAR_V, LINEAR_H = 49152, 576


def quick() -> Tuple[List[Case], List[Entry]]:
    checks = [Case("logits", 32000, 256, "fp32", "grpo"), Case("logits", 32000, 256, "fp32", "lambda_trace"),
              Case("logits", 32000, 256, "bf16", "grpo"),
              Case("linear", 32000, 256, "fp32", "grpo", H=64)]
    # Ours first: whatever the time budget cuts, the CI run has timed our backend and the floor.
    timed = [(Case("logits", 32000, 256, "fp32", "grpo"),
              ["floor", "torch", "eager_fp32", "reference", "trl", "compile_fp32", "triton", "liger_triton"]),
             (Case("logits", 32000, 512, "fp32", "grpo"), ["floor", "torch", "eager_fp32"]),
             (Case("linear", 32000, 256, "fp32", "grpo", H=64), ["torch_linear", "liger_chunked"]),
             (Case("logits", 32000, 256, "fp32", "lambda_trace"), ["torch", "eager_fp32"]),
             (Case("logits", 32000, 256, "bf16", "grpo"), ["torch", "eager_fp32", "trl"])]
    return checks, timed


def smoke() -> Tuple[List[Case], List[Entry]]:
    """A developer's pipeline test: two small N, a thread variant, the linear task, few providers."""
    checks = [Case("logits", 32000, 128, "fp32", "grpo"), Case("linear", 32000, 128, "fp32", "grpo", H=64)]
    timed = [(Case("logits", 32000, 256, "fp32", "grpo"), ["floor", "eager_fp32", "torch", "torch@1t"]),
             (Case("logits", 32000, 512, "fp32", "grpo"), ["floor", "eager_fp32", "torch", "torch@1t"]),
             (Case("linear", 32000, 256, "fp32", "grpo", H=64), LINEAR)]
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
    hidden states, in the linear task at H = 64 (a small LM-head matmul: the loss dominates;
    `lm_head_matmul` times the matmul alone)."""
    checks = [Case("logits", 151936, 128, "fp32", "dapo"), Case("logits", 151936, 128, "fp32", "lambda_both"),
              Case("linear", 151936, 128, "fp32", "dapo", H=64)]
    # "@1t" rows: the same with one intra-op thread, next to the floor with one thread. On this shared
    # 2-core machine other jobs make two-thread OpenMP regions (the floor's exp among them) wait on
    # each other; the one-thread ratios show the work alone.
    ours = ["floor", "torch", "torch_inplace", "floor@1t", "torch@1t", "torch_inplace@1t"]
    timed: List[Entry] = [
        (Case("logits", 151936, 2048, "fp32", "dapo"), ours + ["trl", "reference"]),
        (Case("logits", 151936, 2048, "fp32", "lambda_both"), ours + ["reference"]),
        (Case("linear", 151936, 2048, "fp32", "dapo", H=64), ["torch_linear", "liger_chunked", "lm_head_matmul"]),
    ]
    return checks, timed


def full() -> Tuple[List[Case], List[Entry]]:
    checks = [Case("logits", 32000, 128, dtype, mode) for dtype in ("fp32", "bf16")
              for mode in ("grpo", "dapo", "lambda_trace")]
    checks += [Case("logits", 151936, 128, "fp32", "grpo"), Case("logits", 151936, 128, "bf16", "grpo"),
               Case("logits", 151936, 128, "fp32", "lambda_trace"),
               Case("linear", LINEAR_V, 128, "fp32", "grpo", H=LINEAR_H)]
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
        (Case("linear", LINEAR_V, 512, "fp32", "grpo", H=LINEAR_H), LINEAR),
        (Case("logits", 32000, 8192, "fp32", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 151936, 2048, "fp32", "dapo"), ["eager_fp32", "trl", "torch", "torch@1t", "triton"]),
        (Case("logits", 49152, 2048, "fp32", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 128256, 2048, "fp32", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 151936, 512, "bf16", "grpo"), FAST + ["torch@1t"]),
        (Case("logits", 49152, 8192, "fp32", "grpo"), CHEAP + ["torch@1t"]),
        (Case("linear", LINEAR_V, 2048, "fp32", "grpo", H=LINEAR_H), LINEAR),
    ]
    return checks, timed


def key_case(timed: List[Entry]) -> Optional[Case]:
    for case, _ in timed:
        if case.task == "logits" and case.V == 151936 and case.N == 2048 and case.dtype == "fp32" \
                and case.mode == "grpo":
            return case
    return None
