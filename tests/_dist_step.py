"""One training run through the CLI, recording what the data-parallel test compares (issue 11 point 3).

    torchrun --standalone --nproc_per_node 2 tests/_dist_step.py OUT_PREFIX TRAINER_FLAGS...
    (or in-process: record(OUT_PREFIX, TRAINER_FLAGS))

`lambda_grpo.trainer.cli.main` runs as usual; the trainer class is wrapped so that every process
saves to OUT_PREFIX.rank<r>.pt: the rollouts it generated (by place in the global batch), the
model's and lambda's gradients at every optimiser step (after the all-reduce and clipping, as the
optimiser sees them), and the parameters and lambda after the run.
"""

from __future__ import annotations

import sys

import torch


def record(prefix: str, argv) -> int:
    import lambda_grpo.trainer.loop as loop
    from lambda_grpo.trainer.cli import main

    base = loop.GRPOTrainer

    class Recording(base):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.record = dict(rollouts={}, steps=[])
            step = self.optimizer.step

            def recorded_step(*sa, **sk):
                lam = self.loss_fn.lam
                self.record["steps"].append(dict(
                    grads={n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None},
                    lam_grad=None if lam is None or lam.grad is None else lam.grad.detach().clone()))
                return step(*sa, **sk)

            self.optimizer.step = recorded_step

        def _rollouts(self, prompts, slots):
            batch = super()._rollouts(prompts, slots)
            G = self.cfg.group_size
            for i, s in enumerate(slots):
                rows = slice(i * G, (i + 1) * G)
                self.record["rollouts"][(self.step, s)] = (batch["completion_ids"][rows].clone(),
                                                            batch["completion_mask"][rows].clone(),
                                                            batch["prompt_ids"][rows].clone())
            return batch

        def train(self):
            try:
                return super().train()
            finally:
                lam = self.loss_fn.lam
                self.record.update(
                    params={n: p.detach().clone() for n, p in self.model.named_parameters()},
                    lam=None if lam is None else lam.detach().clone(), world=self.dist.world, rank=self.dist.rank)
                torch.save(self.record, f"{prefix}.rank{self.dist.rank}.pt")

    loop.GRPOTrainer = Recording
    try:
        return main(list(argv))
    finally:
        loop.GRPOTrainer = base


if __name__ == "__main__":
    sys.exit(record(sys.argv[1], sys.argv[2:]))
