"""Prompt datasets with verifiable answers: built-in arithmetic, local jsonl/parquet, reasoning-gym.

Every source yields a `datasets.Dataset` with the columns ``question`` (raw text),
``prompt`` (the text the model sees: chat-templated when the tokenizer has a template) and
``answer`` (the exact expected answer as a string). Train and held-out splits never share a
question.
"""

from __future__ import annotations

import importlib.util
import itertools
import random
from pathlib import Path
from typing import List, Optional, Tuple

from .config import TrainConfig


def render_prompt(tokenizer, question: str, system_prompt: Optional[str], template: str) -> str:
    """The model-facing text for one question (chat template if the tokenizer has one)."""
    user = template.format(question=question)
    if getattr(tokenizer, "chat_template", None):
        msgs = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": user}]
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    prefix = f"{system_prompt}\n" if system_prompt else ""
    return f"{prefix}{user}"


def _apply(op: str, a: int, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def arithmetic_problems(cfg: TrainConfig) -> List[Tuple[str, str]]:
    """Unique (question, answer) pairs "a op b [op c ...]" with operands in [min_value, max_value].

    Small spaces are enumerated exhaustively so that the held-out split is a real partition; large
    ones are sampled without replacement. Expressions follow the usual precedence (Python eval order).
    """
    want = cfg.num_train + cfg.num_eval
    values = range(cfg.min_value, cfg.max_value + 1)
    rng = random.Random(f"arith-{cfg.seed}")
    space = len(values) ** cfg.num_terms * len(cfg.ops) ** (cfg.num_terms - 1)
    if space <= 200_000:
        combos = [(vals, ops) for vals in itertools.product(values, repeat=cfg.num_terms)
                  for ops in itertools.product(cfg.ops, repeat=cfg.num_terms - 1)]
        rng.shuffle(combos)
        combos = combos[:want]
    else:
        seen, combos = set(), []
        while len(combos) < want:
            c = (tuple(rng.choice(values) for _ in range(cfg.num_terms)),
                 tuple(rng.choice(cfg.ops) for _ in range(cfg.num_terms - 1)))
            if c not in seen:
                seen.add(c)
                combos.append(c)
    out = []
    for vals, ops in combos:
        expr = str(vals[0]) + "".join(f" {o} {v}" for o, v in zip(ops, vals[1:]))
        out.append((expr, str(int(eval(expr)))))  # expr is built here from ints and +-*: safe
    return out


def _file_problems(path: str) -> List[Tuple[str, str]]:
    import datasets

    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data_path: expected an existing .jsonl/.parquet file, got {path!r}")
    kind = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(p.suffix)
    if kind is None:
        raise ValueError(f"data_path: expected a .jsonl or .parquet file, got suffix {p.suffix!r}")
    ds = datasets.load_dataset(kind, data_files=str(p), split="train")
    missing = {"prompt", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"data_path: expected columns 'prompt' and 'answer', missing {sorted(missing)} "
                         f"(have {ds.column_names})")
    return [(str(r["prompt"]), str(r["answer"]).strip()) for r in ds]


def _reasoning_gym_problems(cfg: TrainConfig) -> List[Tuple[str, str]]:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ValueError("task: 'reasoning_gym' needs the optional package reasoning-gym (pip install reasoning-gym)")
    import reasoning_gym

    ds = reasoning_gym.create_dataset(cfg.rg_task, size=cfg.num_train + cfg.num_eval, seed=cfg.seed)
    return [(str(e["question"]), str(e["answer"]).strip()) for e in ds]


def build_datasets(cfg: TrainConfig, tokenizer):
    """(train, held_out) `datasets.Dataset`s with columns question / prompt / answer."""
    import datasets

    if cfg.task == "arithmetic":
        problems = arithmetic_problems(cfg)
    elif cfg.task == "file":
        problems = _file_problems(cfg.data_path)
        random.Random(f"file-{cfg.seed}").shuffle(problems)
    else:
        problems = _reasoning_gym_problems(cfg)
    # Deduplicate before splitting so that no held-out question is also a training question.
    problems = list(dict.fromkeys(problems))
    n_eval = min(cfg.num_eval, len(problems) // 2)
    held, train = problems[:n_eval], problems[n_eval:n_eval + cfg.num_train]
    if not train:
        raise ValueError(f"num_train: the task yields only {len(problems)} unique problems, none left for training")

    def make(rows):
        return datasets.Dataset.from_dict({
            "question": [q for q, _ in rows],
            "prompt": [render_prompt(tokenizer, q, cfg.system_prompt, cfg.prompt_template)
                       if cfg.task != "file" or not _looks_templated(q) else q for q, _ in rows],
            "answer": [a for _, a in rows],
        })

    return make(train), make(held)


def _looks_templated(text: str) -> bool:
    """A file prompt that already contains chat markup is used verbatim."""
    return "<|im_start|>" in text or "<|start_header_id|>" in text or "[INST]" in text
