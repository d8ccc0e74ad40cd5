"""The GRPO training loop: sample, score, advantages, fused loss, optimiser steps, logs, checkpoints.

One step (docs/math.md §1-§5, issue 4):
  1. take ``prompts_per_step`` training prompts (chosen by a per-step seed), generate
     ``group_size`` completions each with sampling at the loss temperature, KV cache on;
  2. score every completion (exact final-number match, optional format reward) and turn the
     rewards into group-relative advantages with `group_advantages`;
  3. behaviour log-probs with `token_logprobs` under no_grad, only when the policy moves
     before the last gradient is taken (mu > 1 or several mini-batches; otherwise old = logp
     is exact) and reference log-probs from a frozen copy only when beta > 0;
  4. mu inner epochs over ``num_mini_batches`` mini-batches, each accumulated over micro-batches
     of whole groups with the mini-batch's global token and sequence counts as normalisers,
     then gradient clipping (model only), an AdamW step for the model and a separate step for
     lambda (its own optimiser, SGD with lr 0.1 by default: docs/math.md §5).

Every step reseeds torch and the prompt sampler from (seed, step), so a run resumed from a
checkpoint reproduces the metrics of an uninterrupted run exactly.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .. import GRPOLoss, group_advantages, linear_token_logprobs, token_logprobs
from .config import TrainConfig
from .data import build_datasets, load_problems
from .dist import check_world, env_world_size, local_prompt_slots, setup as setup_dist
from .model import check_hidden_route, hidden_route_parts, load_model_and_tokenizer, resolve_device
from .rewards import correctness_rewards, extract_number, answers_match, format_rewards

log = logging.getLogger("lambda_grpo.trainer")

STATE_FILE = "state.pt"


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7_919 + 12_345) % (2**62)


def _generation_seed(seed: int, step: int, chunk: int) -> int:
    """The seed of the generate call for the chunk-th block of prompts of a step's global batch:
    the same on whichever process generates it (lambda_grpo/trainer/dist.py)."""
    return (_step_seed(seed, step) * 1_000_033 + chunk * 104_729 + 1) % (2**62)


def pick_threads(threads: int) -> Optional[int]:
    """The torch CPU thread count a run uses: threads > 0: exactly that many. 0: None (leave
    torch's setting alone) unless the CPU is already busy, then half the cores.

    On a machine shared with other jobs (load average >= cores) OpenMP threads spin against each
    other: measured here, 12-token generation for 64 prompts took 108 s with 2 threads vs 27 s with 1.
    """
    if threads:
        return threads
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if torch.cuda.is_available() or load < cores:
        log.info("threads: %d (torch default; load average %.1f on %d cores)", torch.get_num_threads(), load, cores)
        return None
    n = max(1, cores // 2)
    log.info("threads: %d (the CPU is busy: load average %.1f on %d cores; --threads N to override)", n, load, cores)
    return n


@contextlib.contextmanager
def thread_count(n: Optional[int]):
    """torch.set_num_threads(n) for the duration of the block, restored afterwards (the thread
    count is process-wide: a library call must not leave it changed). None: leave it alone."""
    before = torch.get_num_threads()
    if n is not None and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def _with_threads(method):
    """Run a GRPOTrainer method under the run's thread count (see `thread_count`)."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with thread_count(self.threads):
            return method(self, *args, **kwargs)
    return wrapper


def find_checkpoint(where: str, output_dir) -> Path:
    """The state file of ``--resume`` (a checkpoint directory, its state file, or 'latest' in
    output_dir); a ValueError naming resume if there is none."""
    path = Path(where)
    if where == "latest":
        found = sorted(Path(output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1])
                       if p.name.split("-")[1].isdigit() else -1)
        if not found:
            raise ValueError(f"resume: expected a checkpoint-* directory in {output_dir}, found none")
        path = found[-1]
    file = path / STATE_FILE if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"resume: expected a checkpoint directory containing {STATE_FILE}, got {where!r}")
    return file


class GRPOTrainer:
    """Small, readable GRPO-family trainer around `lambda_grpo.GRPOLoss`.

    ``model``/``tokenizer`` may be passed in (tests build a tiny Llama in code); otherwise
    ``cfg.model`` is loaded (a local Hugging Face directory or the built-in SmolLM2).
    """

    def __init__(self, cfg: TrainConfig, model=None, tokenizer=None):
        if not isinstance(cfg, TrainConfig):
            raise ValueError(f"cfg: expected a TrainConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        # The thread count is applied only while a method of this trainer runs (and restored
        # afterwards): torch.set_num_threads is process-wide.
        self.threads = pick_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        check_world(cfg, env_world_size())
        # the data first: a bad data file is reported before the model loads
        problems = load_problems(cfg)
        if cfg.resume:
            find_checkpoint(cfg.resume, cfg.output_dir)
        # torchrun: join the data-parallel group (one CUDA device per process)
        self.dist, self.device = setup_dist(self.device)
        torch.manual_seed(cfg.seed)
        t0 = time.perf_counter()
        if model is None:
            dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
            model, tokenizer = load_model_and_tokenizer(cfg.model, cfg.cache_dir, self.device, dtype)
        elif tokenizer is None:
            raise ValueError("tokenizer: expected a tokenizer when a model object is passed in, got None")
        else:
            model.to(self.device).train()
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
        self.load_time = time.perf_counter() - t0
        self.model, self.tok = model, tokenizer
        self.dist.broadcast_params(model)  # every rank starts from rank 0's weights, as DDP does
        if cfg.loss_route == "hidden":
            check_hidden_route(model)
        if cfg.trainable_layers:
            self._freeze_lower_layers(cfg.trainable_layers)
        self.eos_ids = self._eos_ids()
        self.train_ds, self.eval_ds = build_datasets(cfg, tokenizer, problems)
        log.info("data: %d training prompts, %d held-out prompts (task=%s); example prompt:\n%s",
                 len(self.train_ds), len(self.eval_ds), cfg.task, self.train_ds[0]["prompt"])

        loss_cfg = cfg.loss
        if loss_cfg.aggregation == "dr_grpo" and loss_cfg.max_completion_length is None:
            # Dr. GRPO divides by a constant L; the padded length of a micro-batch is not constant.
            loss_cfg = loss_cfg.replace(max_completion_length=cfg.max_new_tokens)
        self.loss_fn = GRPOLoss(loss_cfg, backend=cfg.backend, lam_init=cfg.lambda_init).to(self.device)
        self.ref_model = None
        if loss_cfg.beta > 0:
            self.ref_model = copy.deepcopy(model).eval()
            for p in self.ref_model.parameters():
                p.requires_grad_(False)

        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                           weight_decay=cfg.weight_decay)
        self.lambda_optimizer = None
        if self.loss_fn.lam is not None:
            if cfg.lambda_optimizer == "sgd":
                self.lambda_optimizer = torch.optim.SGD([self.loss_fn.lam], lr=cfg.lambda_lr)
            else:
                self.lambda_optimizer = torch.optim.Adam([self.loss_fn.lam], lr=cfg.lambda_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.step = 0
        self.out = Path(cfg.output_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out / "metrics.jsonl"
        self.history: List[Dict] = []
        if cfg.resume:
            self.load_checkpoint(cfg.resume)
        elif self.dist.main:
            self.metrics_path.write_text("")
        if self.dist.main:  # every file of the run is written by rank 0 only
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))

    # ---------------------------------------------------------------- helpers
    def _eos_ids(self) -> List[int]:
        ids = {self.tok.eos_token_id}
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        return sorted(i for i in ids if i is not None)

    def _freeze_lower_layers(self, n: int) -> None:
        """Train only the top n decoder layers and the final norm (CPU budget: a shorter backward)."""
        inner = getattr(self.model, "model", None)
        layers = getattr(inner, "layers", None)
        if layers is None:
            raise ValueError(f"trainable_layers: expected a model with .model.layers (Llama-like), got "
                             f"{type(self.model).__name__}")
        if n > len(layers):
            raise ValueError(f"trainable_layers: expected <= {len(layers)} (the model's layers), got {n}")
        for p in self.model.parameters():
            p.requires_grad_(False)
        for mod in list(layers[len(layers) - n:]) + [getattr(inner, "norm", None)]:
            if mod is not None:
                for p in mod.parameters():
                    p.requires_grad_(True)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        log.info("trainable: top %d of %d layers (%.1fM parameters)", n, len(layers), n_train / 1e6)

    def _lr_factor(self, step: int) -> float:
        cfg = self.cfg
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant" or cfg.steps <= cfg.warmup_steps:
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        if cfg.lr_schedule == "linear":
            return max(0.0, 1.0 - frac)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))

    def _encode(self, prompts: List[str]):
        enc = self.tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)

    @torch.no_grad()
    @_with_threads
    def generate(self, prompts: List[str], n: int, sample: bool):
        """Completions for each prompt, n per prompt, rows grouped per prompt.

        Returns dict: prompt_ids (B, Tp) left-padded, prompt_mask (B, Tp), completion_ids (B, Tc),
        completion_mask (B, Tc) (1 up to and including the first EOS), finished (B,) bool, texts.
        """
        ids, att = self._encode(prompts)
        ids, att = ids.repeat_interleave(n, 0), att.repeat_interleave(n, 0)
        was_training = self.model.training
        self.model.eval()
        kw = dict(do_sample=True, temperature=self.loss_fn.config.temperature, top_p=self.cfg.top_p, top_k=0) \
            if sample else dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=ids, attention_mask=att, max_new_tokens=self.cfg.max_new_tokens,
                                  eos_token_id=self.eos_ids, pad_token_id=self.tok.pad_token_id,
                                  use_cache=True, **kw)
        self.model.train(was_training)
        comp = out[:, ids.shape[1]:]
        is_eos = torch.zeros_like(comp, dtype=torch.bool)
        for e in self.eos_ids:
            is_eos |= comp == e
        finished = is_eos.any(dim=1)
        first = torch.where(finished, is_eos.float().argmax(dim=1),
                            torch.full_like(finished, comp.shape[1], dtype=torch.long))
        pos = torch.arange(comp.shape[1], device=comp.device)[None, :]
        cmask = (pos <= first[:, None]) & (pos < comp.shape[1])
        texts = [self.tok.decode(c[m], skip_special_tokens=True) for c, m in zip(comp, cmask)]
        return dict(prompt_ids=ids, prompt_mask=att, completion_ids=comp, completion_mask=cmask.long(),
                    finished=finished, texts=texts)

    @staticmethod
    def _inputs(prompt_ids, prompt_mask, comp_ids, comp_mask):
        ids = torch.cat([prompt_ids, comp_ids], dim=1)
        att = torch.cat([prompt_mask, comp_mask], dim=1)
        pos = (att.cumsum(dim=1) - 1).clamp(min=0)
        return dict(input_ids=ids, attention_mask=att, position_ids=pos, use_cache=False)

    def _logits(self, model, prompt_ids, prompt_mask, comp_ids, comp_mask):
        """Aligned logits (B, Tc, V): logits[b, t] scores comp_ids[b, t] (last position dropped)."""
        out = model(**self._inputs(prompt_ids, prompt_mask, comp_ids, comp_mask),
                    logits_to_keep=comp_ids.shape[1] + 1)
        return out.logits[:, :-1]

    def _hidden(self, model, prompt_ids, prompt_mask, comp_ids, comp_mask):
        """Aligned last hidden states (B, Tc, H) and the LM head (weight (V, H), bias or None):
        lm_head(hidden[b, t]) are the logits that score comp_ids[b, t], as `_logits` returns them.
        The backbone's output is the final-normed state the LM head reads (checked once at start
        by `check_hidden_route`); the logits are never made."""
        backbone, head = hidden_route_parts(model)
        h = backbone(**self._inputs(prompt_ids, prompt_mask, comp_ids, comp_mask)).last_hidden_state
        return h[:, -(comp_ids.shape[1] + 1):-1], head.weight, head.bias

    @torch.no_grad()
    def _logprobs(self, model, batch, rows) -> torch.Tensor:
        """Per-token log-probs of the completions under ``model`` (no gradient), micro-batch by
        micro-batch, by the run's loss route (from hidden states: the logits never exist)."""
        chunks = []
        mb = self.cfg.micro_batch_prompts * self.cfg.group_size
        tau = self.loss_fn.config.temperature
        for s in range(0, len(rows), mb):
            r = rows[s:s + mb]
            args = (model, batch["prompt_ids"][r], batch["prompt_mask"][r], batch["completion_ids"][r],
                    batch["completion_mask"][r])
            if self.cfg.loss_route == "hidden":
                h, w, b = self._hidden(*args)
                lp, _ = linear_token_logprobs(h, w, batch["completion_ids"][r], bias=b, temperature=tau,
                                              return_entropy=False, backend=self.cfg.backend)
            else:
                lp = token_logprobs(self._logits(*args), batch["completion_ids"][r], temperature=tau,
                                    backend=self.cfg.backend)
            chunks.append(lp.float())
        return torch.cat(chunks)

    def _micro_loss(self, batch, r, mask, adv, old_logp, ref_logp, n_tok, n_seq):
        """The loss of micro-batch rows r with the mini-batch's normalisers, by the loss route."""
        args = (self.model, batch["prompt_ids"][r], batch["prompt_mask"][r], batch["completion_ids"][r],
                batch["completion_mask"][r])
        kw = dict(old_logp=None if old_logp is None else old_logp[r],
                  ref_logp=None if ref_logp is None else ref_logp[r], num_tokens=n_tok, num_sequences=n_seq)
        G = self.cfg.group_size
        if self.cfg.loss_route == "hidden":
            h, w, b = self._hidden(*args)
            return self.loss_fn.forward_hidden(h, w, batch["completion_ids"][r], mask[r], adv[r], G, bias=b, **kw)
        return self.loss_fn(self._logits(*args), batch["completion_ids"][r], mask[r], adv[r], group_size=G, **kw)

    # ---------------------------------------------------------------- evaluation
    @torch.no_grad()
    @_with_threads
    def evaluate(self, tag: str) -> Dict[str, float]:
        """Greedy accuracy on the held-out prompts; writes eval_<tag>.jsonl with every completion."""
        cfg, d, t0 = self.cfg, self.dist, time.perf_counter()
        mine = []  # (batch index, rows): batch i is generated by process i % world, the same batches as one process
        for i, s in enumerate(range(0, len(self.eval_ds), cfg.eval_batch_size)):
            if i % d.world != d.rank:
                continue
            part = self.eval_ds[s:s + cfg.eval_batch_size]
            g = self.generate(list(part["prompt"]), 1, sample=False)
            got = []
            for q, a, text, m in zip(part["question"], part["answer"], g["texts"], g["completion_mask"]):
                pred = extract_number(text)
                got.append(dict(question=q, answer=a, completion=text, pred=pred, correct=bool(answers_match(pred, a)),
                                length=int(m.sum())))
            mine.append((i, got))
        done = sorted((b for per_rank in d.all_gather_objects(mine) for b in per_rank), key=lambda b: b[0])
        rows = [r for _, got in done for r in got]
        lengths = [r.pop("length") for r in rows]
        n_ok = sum(r["correct"] for r in rows)
        if d.main:
            with open(self.out / f"eval_{tag}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        n = max(1, len(rows))
        res = dict(eval_accuracy=n_ok / n, eval_length=sum(lengths) / n, eval_n=len(rows),
                   eval_time=time.perf_counter() - t0)
        log.info("held-out greedy accuracy [%s]: %.3f (%d/%d), mean length %.1f tokens, %.1f s", tag,
                 res["eval_accuracy"], n_ok, len(rows), res["eval_length"], res["eval_time"])
        return res

    def _rollouts(self, prompts: List[str], slots: List[int]):
        """Sampled completions for this process's prompts (``slots``: their places in the step's
        global batch), generated ``generation_batch_prompts`` prompts per call, each call seeded
        from (seed, step, its block of the global batch); rows grouped per prompt. Prompts and
        completions are padded to the widths of the whole global batch (max over the processes),
        so that every row has the same inputs whichever process trains it."""
        cfg, G, k = self.cfg, self.cfg.group_size, self.cfg.generation_batch_prompts
        parts = []
        for s in range(0, len(prompts), k):
            torch.manual_seed(_generation_seed(cfg.seed, self.step, slots[s] // k))
            parts.append(self.generate(prompts[s:s + k], G, sample=True))
        widths = torch.tensor([max(p["prompt_ids"].shape[1] for p in parts),
                               max(p["completion_ids"].shape[1] for p in parts)], device=self.device)
        tp, tc = (int(w) for w in self.dist.all_reduce_max(widths))
        pad = self.tok.pad_token_id

        def left(x, width, value):
            return torch.nn.functional.pad(x, (width - x.shape[1], 0), value=value)

        def right(x, width, value):
            return torch.nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        return dict(prompt_ids=torch.cat([left(p["prompt_ids"], tp, pad) for p in parts]),
                    prompt_mask=torch.cat([left(p["prompt_mask"], tp, 0) for p in parts]),
                    completion_ids=torch.cat([right(p["completion_ids"], tc, pad) for p in parts]),
                    completion_mask=torch.cat([right(p["completion_mask"], tc, 0) for p in parts]),
                    finished=torch.cat([p["finished"] for p in parts]),
                    texts=[t for p in parts for t in p["texts"]])

    def _global_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Per-row values of every process, in the order of the global batch (prompt place x G)."""
        d = self.dist
        if not d.active:
            return x
        cfg, G = self.cfg, self.cfg.group_size
        gathered = d.all_gather_rows(x.to(self.device))  # (gloo has no bool: callers pass numbers)
        order = torch.tensor([s * G + j for r in range(d.world)
                              for s in local_prompt_slots(cfg.prompts_per_step, cfg.num_mini_batches, d.world, r)
                              for j in range(G)], device=gathered.device)
        out = torch.empty_like(gathered)
        out[order] = gathered
        return out

    # ---------------------------------------------------------------- one step
    @_with_threads
    def train_step(self) -> Dict[str, float]:
        cfg, G, d = self.cfg, self.cfg.group_size, self.dist
        t_start = time.perf_counter()
        torch.manual_seed(_step_seed(cfg.seed, self.step))
        # the global batch: the same draw on every process
        rng = random.Random(_step_seed(cfg.seed, self.step))
        idx = rng.sample(range(len(self.train_ds)), min(cfg.prompts_per_step, len(self.train_ds)))
        while len(idx) < cfg.prompts_per_step:  # tiny datasets: repeat prompts
            idx.append(rng.randrange(len(self.train_ds)))
        slots = local_prompt_slots(cfg.prompts_per_step, cfg.num_mini_batches, d.world, d.rank)
        part = self.train_ds[[idx[s] for s in slots]]  # this process's share, dict of lists
        batch = self._rollouts(list(part["prompt"]), slots)
        t_gen = time.perf_counter() - t_start

        answers = [a for a in part["answer"] for _ in range(G)]
        correct = torch.tensor(correctness_rewards(batch["texts"], answers))
        fmt = torch.tensor(format_rewards(batch["texts"], batch["finished"].tolist()))
        rewards = correct + cfg.format_weight * fmt
        mask = batch["completion_mask"].clone()
        if cfg.mask_truncated:
            mask[~batch["finished"]] = 0
        lengths = batch["completion_mask"].sum(dim=1).float()

        B = rewards.shape[0]  # this process's rows
        if d.active:  # advantages (and the logged metrics) from the rewards of the whole batch
            own = torch.tensor([s * G + j for s in slots for j in range(G)], device=self.device)
            g_rewards, g_correct, g_fmt, g_lengths, g_finished = (self._global_rows(t) for t in (
                rewards, correct, fmt, lengths, batch["finished"].float()))
            adv = group_advantages(g_rewards, G, scale=cfg.adv_scale)[own].to(self.device)
        else:
            g_rewards, g_correct, g_fmt, g_lengths, g_finished = rewards, correct, fmt, lengths, batch["finished"]
            adv = group_advantages(rewards, G, scale=cfg.adv_scale).to(self.device)
        need_old = cfg.num_iterations > 1 or cfg.num_mini_batches > 1
        all_rows = torch.arange(B, device=self.device)
        old_logp = self._logprobs(self.model, batch, all_rows) if need_old else None
        ref_logp = self._logprobs(self.ref_model, batch, all_rows) if self.ref_model is not None else None

        rows_per_mini = B // cfg.num_mini_batches
        micro = min(cfg.micro_batch_prompts * G, rows_per_mini)
        n_micro = math.ceil(rows_per_mini / micro)
        loss_scale = 1.0 / n_micro if self.loss_fn.config.aggregation == "bnpo" else 1.0  # bnpo is local-only
        sums: Dict[str, float] = {}
        tok_total, loss_total, grad_norms, lam_grads, n_opt = 0.0, 0.0, [], [], 0
        params = [p for p in self.model.parameters() if p.requires_grad]
        lam = self.loss_fn.lam
        for _epoch in range(cfg.num_iterations):
            for mb in range(cfg.num_mini_batches):
                rows = all_rows[mb * rows_per_mini:(mb + 1) * rows_per_mini]
                n_tok = mask[rows].sum()
                if d.active:
                    # each process's share of the mini-batch's global token count (its sequence
                    # share is its own row count): the average of the rank losses is the global loss
                    n_tok = d.all_reduce_sum(n_tok) / d.world
                self.optimizer.zero_grad(set_to_none=True)
                if self.lambda_optimizer is not None:
                    self.lambda_optimizer.zero_grad(set_to_none=True)
                for s in range(0, len(rows), micro):
                    r = rows[s:s + micro]
                    out = self._micro_loss(batch, r, mask, adv, old_logp, ref_logp, n_tok, len(rows))
                    (out.loss * loss_scale).backward()
                    w = float(mask[r].sum())
                    tok_total += w
                    loss_total += float(out.loss.detach()) * loss_scale
                    for k, v in out.metrics.items():
                        if v.dim() == 0 and k != "lambda":
                            sums[k] = sums.get(k, 0.0) + float(v) * w
                # the mean gradient over the processes, model and lambda alike (DDP's all-reduce)
                d.average_grads(params + ([lam] if lam is not None else []))
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(
                    params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))))
                if lam is not None and lam.grad is not None:
                    lam_grads.append(float(lam.grad))
                self.optimizer.step()
                if self.lambda_optimizer is not None:
                    self.lambda_optimizer.step()
                n_opt += 1
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        if d.active:  # the logged loss and token-weighted metrics of the whole batch
            keys = sorted(sums)
            red = d.all_reduce_sum(torch.tensor([loss_total, tok_total] + [sums[k] for k in keys],
                                                dtype=torch.float64, device=self.device)).tolist()
            loss_total, tok_total = red[0] / d.world, red[1]
            sums = dict(zip(keys, red[2:]))
        dt = time.perf_counter() - t_start

        groups = g_rewards.view(-1, G)
        m = dict(step=self.step, reward=float(g_rewards.mean()), reward_std=float(g_rewards.std()),
                 accuracy=float(g_correct.float().mean()), format=float(g_fmt.float().mean()),
                 solved_groups=float((groups.max(1).values > groups.min(1).values).float().mean()),
                 completion_len=float(g_lengths.mean()), completion_len_min=float(g_lengths.min()),
                 completion_len_max=float(g_lengths.max()), finished_frac=float(g_finished.float().mean()),
                 loss=loss_total / n_opt)
        for k, v in sums.items():
            m[k] = v / max(1.0, tok_total)
        m["lambda"] = float(lam.detach()) if lam is not None else None
        m["lambda_grad"] = sum(lam_grads) / len(lam_grads) if lam_grads else None
        m.update(grad_norm=sum(grad_norms) / len(grad_norms), lr=lr, step_time=dt, gen_time=t_gen,
                 tokens_per_s=float(g_lengths.sum()) / dt)  # sampled completion tokens per s, all processes
        return m

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self) -> Path:
        """checkpoint-<step>/state.pt, written by rank 0 (every rank holds the same state)."""
        path = self.out / f"checkpoint-{self.step}"
        if not self.dist.main:
            self.dist.barrier()
            return path
        path.mkdir(parents=True, exist_ok=True)
        state = dict(step=self.step, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                     scheduler=self.scheduler.state_dict(), loss_fn=self.loss_fn.state_dict(),
                     lambda_optimizer=None if self.lambda_optimizer is None else self.lambda_optimizer.state_dict(),
                     config=self.cfg.to_dict())
        torch.save(state, path / STATE_FILE)
        log.info("checkpoint: %s", path)
        self.dist.barrier()
        return path

    def load_checkpoint(self, where: str) -> None:
        file = find_checkpoint(where, self.out)
        state = torch.load(file, map_location=self.device, weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss_fn.load_state_dict(state["loss_fn"])
        if self.lambda_optimizer is not None and state["lambda_optimizer"] is not None:
            self.lambda_optimizer.load_state_dict(state["lambda_optimizer"])
        self.step = int(state["step"])
        kept = []
        if self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                row = json.loads(line)
                if row.get("step", 0) <= self.step:
                    kept.append(line)
        self.dist.barrier()  # every process has read the metrics before rank 0 rewrites them
        if self.dist.main:
            self.metrics_path.write_text("".join(k + "\n" for k in kept))
        self.history = [json.loads(k) for k in kept]
        log.info("resumed from %s at step %d", file, self.step)

    # ---------------------------------------------------------------- the run
    def _log_row(self, row: Dict) -> None:
        self.history.append(row)
        if self.dist.main:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    @_with_threads
    def train(self) -> Dict:
        """Run to ``cfg.steps``; returns a summary (held-out accuracy before/after, wall time, paths)."""
        cfg, t0 = self.cfg, time.perf_counter()
        summary: Dict = dict(load_time=self.load_time)
        if cfg.num_eval and cfg.eval_before and self.step == 0:
            before = self.evaluate("before")
            summary["eval_before"] = before["eval_accuracy"]
            summary["eval_length_before"] = before["eval_length"]
            self._log_row(dict(step=0, **before))
        bar = None
        if cfg.progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=self.step, desc="train", dynamic_ncols=True)
        while self.step < cfg.steps:
            m = self.train_step()
            self._log_row(m)
            if bar is not None:
                bar.update(1)
                post = dict(reward=f"{m['reward']:.2f}", len=f"{m['completion_len']:.1f}")
                if m["lambda"] is not None:
                    post["lam"] = f"{m['lambda']:.3f}"
                bar.set_postfix(post)
            else:
                log.info("step %d reward %.3f len %.1f lambda %s %.1fs", m["step"], m["reward"],
                         m["completion_len"], m["lambda"], m["step_time"])
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps and cfg.num_eval:
                self._log_row(dict(step=self.step, **self.evaluate(f"step{self.step}")))
            if cfg.save_every and self.step % cfg.save_every == 0:
                self.save_checkpoint()
        if bar is not None:
            bar.close()
        if cfg.num_eval:
            after = self.evaluate("after")
            summary["eval_after"] = after["eval_accuracy"]
            summary["eval_length_after"] = after["eval_length"]
            self._log_row(dict(step=self.step, **after))
        train_rows = [r for r in self.history if "reward" in r]
        summary.update(
            steps=self.step, train_time=time.perf_counter() - t0,
            final_lambda=float(self.loss_fn.lam.detach()) if self.loss_fn.lam is not None else None,
            mean_completion_len=((sum(r["completion_len"] for r in train_rows) / len(train_rows))
                                 if train_rows else None),
            metrics=str(self.metrics_path))
        if cfg.plot and self.dist.main:
            from .plot import plot_metrics

            summary["plot"] = str(plot_metrics(self.history, self.out / "curves.png", title=cfg.output_dir))
        if self.dist.active:
            summary["processes"] = self.dist.world
        if self.dist.main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary
