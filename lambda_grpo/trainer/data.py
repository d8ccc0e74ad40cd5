"""Prompt datasets with verifiable answers: built-in arithmetic, local jsonl/parquet, reasoning-gym.

Every source yields a `datasets.Dataset` with the columns ``question`` (raw text),
``prompt`` (the text the model sees: chat-templated when the tokenizer has a template) and
``answer`` (the exact expected answer as a string). Train and held-out splits never share a
question.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
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


def _row_problem(row, where: str) -> Tuple[str, str]:
    if not isinstance(row, dict):
        raise ValueError(f"data_path: {where}: expected an object with 'prompt' and 'answer', "
                         f"got {type(row).__name__}")
    missing = [k for k in ("prompt", "answer") if k not in row]
    if missing:
        raise ValueError(f"data_path: {where}: expected keys 'prompt' and 'answer', missing {missing} "
                         f"(have {sorted(row)})")
    for k in ("prompt", "answer"):
        if row[k] is None or isinstance(row[k], (dict, list)):
            raise ValueError(f"data_path: {where}: expected '{k}' to be a string or a number, got {row[k]!r}")
    return str(row["prompt"]), str(row["answer"]).strip()


def _json_problems(p: Path) -> List[Tuple[str, str]]:
    """JSON lines (one object per line; blank lines skipped), or for .json also one JSON array of
    objects. Parsed here rather than by `datasets`, whose json loader reports a malformed line as a
    DatasetGenerationError traceback and fails on columns of mixed types (answer 3 vs "3")."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"data_path: {p}: expected UTF-8 text, got undecodable bytes at offset {e.start}") from None
    if p.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"data_path: {p}: expected a JSON array of objects, got invalid JSON at line {e.lineno} "
                             f"column {e.colno} ({e.msg})") from None
        return [_row_problem(r, f"{p}: item {i}") for i, r in enumerate(rows)]
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"data_path: {p}: line {n}: expected one JSON object per line, got invalid JSON at "
                             f"column {e.colno} ({e.msg})") from None
        out.append(_row_problem(row, f"{p}: line {n}"))
    return out


def _parquet_problems(p: Path) -> List[Tuple[str, str]]:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(p)
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise ValueError("data_path: a .parquet file needs pyarrow (pip install pyarrow)") from None
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for a file that is not parquet
        raise ValueError(f"data_path: {p}: expected a parquet file, got one pyarrow cannot read "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    missing = [k for k in ("prompt", "answer") if k not in table.column_names]
    if missing:
        raise ValueError(f"data_path: {p}: expected columns 'prompt' and 'answer', missing {missing} "
                         f"(have {table.column_names})")
    cols = table.select(["prompt", "answer"]).to_pylist()
    return [_row_problem(r, f"{p}: row {i}") for i, r in enumerate(cols)]


def file_problems(path: Optional[str]) -> List[Tuple[str, str]]:
    """(question, answer) pairs of a local .jsonl / .json / .parquet file with prompt and answer.

    Every problem with the file (missing, wrong suffix, malformed line, missing key, empty) is a
    ValueError naming data_path, the file and the line; the CLI checks the file with this before
    it loads a model."""
    p = Path(path) if path else None
    if p is None or not p.is_file():
        raise ValueError(f"data_path: expected an existing .jsonl/.json/.parquet file, got {path!r}"
                         + (" (a directory)" if p is not None and p.is_dir() else ""))
    if p.suffix not in (".jsonl", ".json", ".parquet"):
        raise ValueError(f"data_path: expected a .jsonl, .json or .parquet file, got suffix {p.suffix!r} ({p})")
    problems = _parquet_problems(p) if p.suffix == ".parquet" else _json_problems(p)
    if not problems:
        raise ValueError(f"data_path: {p}: expected at least one prompt/answer row, got none")
    return problems


def _reasoning_gym_problems(cfg: TrainConfig) -> List[Tuple[str, str]]:
    if importlib.util.find_spec("reasoning_gym") is None:
        raise ValueError("task: 'reasoning_gym' needs the optional package reasoning-gym (pip install reasoning-gym)")
    import reasoning_gym

    ds = reasoning_gym.create_dataset(cfg.rg_task, size=cfg.num_train + cfg.num_eval, seed=cfg.seed)
    return [(str(e["question"]), str(e["answer"]).strip()) for e in ds]


def load_problems(cfg: TrainConfig) -> List[Tuple[str, str]]:
    """The task's (question, answer) pairs, before any model or tokenizer exists (so that a bad
    data file or a missing optional package is reported before the model loads)."""
    if cfg.task == "arithmetic":
        return arithmetic_problems(cfg)
    if cfg.task == "file":
        problems = file_problems(cfg.data_path)
        random.Random(f"file-{cfg.seed}").shuffle(problems)
        return problems
    return _reasoning_gym_problems(cfg)


def build_datasets(cfg: TrainConfig, tokenizer, problems: Optional[List[Tuple[str, str]]] = None):
    """(train, held_out) `datasets.Dataset`s with columns question / prompt / answer.

    problems: the output of `load_problems(cfg)` if already loaded."""
    import datasets

    if problems is None:
        problems = load_problems(cfg)
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
