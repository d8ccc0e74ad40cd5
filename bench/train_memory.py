"""Peak memory of training steps of the built-in trainer, logits route vs hidden route (issue 10 point 7).

    python -m bench.train_memory                          # --preset demo, 2 steps, both routes
    python -m bench.train_memory --steps 1 -- --trainable-layers 0   # flags after -- go to the trainer

Each route runs in its own fresh process (`--child ROUTE`): the trainer is built with the
`--preset demo` settings (plus any trainer flags after `--`, plus `--loss-route ROUTE`,
`--num-eval 0`, `--threads 1`); after a warm-up (one greedy completion: the first forward of a
process makes one-time allocations, and in a real run the held-out evaluation comes first) each
training step is measured as bench/worker.py measures a loss call: glibc's free heap is
returned (malloc_trim), the baseline VmRSS is read, the kernel's high-water mark is reset
(`echo 5 > /proc/self/clear_refs`), and after the step VmHWM minus the baseline is the step's
peak additional resident memory (rollout generation, the forward and
backward, the optimiser step; on the first step the optimiser's state is created too). On CUDA:
torch.cuda.max_memory_allocated over the allocated baseline. Memory, not time: the figures do
not depend on the machine's load (the step times printed next to them do).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

from .child import run_child_json

MIB = 2**20


def _child(route: str, steps: int, extra) -> dict:
    import torch

    from lambda_grpo.trainer import GRPOTrainer
    from lambda_grpo.trainer.cli import build_parser, config_from_args

    from .worker import MemProbe

    with tempfile.TemporaryDirectory() as out:
        argv = ["--preset", "demo", "--num-eval", "0", "--no-plot", "--no-progress", "--quiet", "--threads", "1",
                "--output-dir", out, *extra, "--loss-route", route]
        cfg = config_from_args(build_parser().parse_args(argv))
        t = GRPOTrainer(cfg)
        dev = t.device.type
        probe = MemProbe(dev)
        if not probe.ok:
            raise SystemExit("cannot reset the high-water mark (/proc/self/clear_refs): Linux only")
        # warm-up: the first forward of a process makes one-time allocations (hundreds of MiB here);
        # in a real run the held-out evaluation comes first. One greedy completion, as it does.
        t.generate([t.train_ds[0]["prompt"]], 1, sample=False)
        rows = []
        for _ in range(steps):
            probe.start()
            t0 = time.perf_counter()
            m = t.train_step()
            rows.append(dict(peak_mib=probe.peak() / MIB, baseline_mib=probe.base / MIB,
                             step_time_s=time.perf_counter() - t0, completion_len_max=m["completion_len_max"],
                             loss=m["loss"], lam=m["lambda"]))
        trainable = sum(p.numel() for p in t.model.parameters() if p.requires_grad)
        head = t.model.get_output_embeddings().weight
        B = cfg.batch_size
        # the buffers the routes differ by: the (B, Tc, V) fp32 logits of the step's widest micro-batch
        # (the logits route makes them and their gradient) and the (V, H) fp32 dW (the hidden route, when
        # the LM head is trained)
        tc = int(max(r["completion_len_max"] for r in rows))
        return dict(route=route, device=dev, steps=rows,
                    logits_buffer_mib=min(B, cfg.micro_batch_prompts * cfg.group_size) * tc * head.shape[0] * 4 / MIB,
                    dweight_buffer_mib=head.numel() * 4 / MIB, trainable_params=trainable, vocab=head.shape[0],
                    hidden=head.shape[1],
                    rows=B, lm_head_trainable=bool(head.requires_grad), threads=cfg.threads, torch=torch.__version__,
                    argv=argv)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_memory", description=__doc__.split("\n\n")[0])
    p.add_argument("--routes", default="logits,hidden", help="comma-separated loss routes, each in a fresh process")
    p.add_argument("--steps", type=int, default=2, help="training steps measured (each on its own)")
    p.add_argument("--mmap-threshold", type=int, default=0,
                   help="bytes: run the children with MALLOC_MMAP_THRESHOLD_ set, so that glibc maps every "
                        "block above it separately and unmaps it when freed: the resident set then follows the "
                        "live tensors instead of what the heap keeps (0: glibc's default, dynamic threshold)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("trainer", nargs="*", help="trainer flags (after --)")
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args.child, args.steps, args.trainer)))
        return 0
    results = []
    for route in [r for r in args.routes.split(",") if r]:
        cmd = [sys.executable, "-m", "bench.train_memory", "--child", route, "--steps", str(args.steps), "--",
               *args.trainer]
        r, err = run_child_json(cmd, args.mmap_threshold)
        if r is None:
            sys.stderr.write(err)
            return 1
        results.append(r)
    for r in results:
        steps = ", ".join(f"step {i + 1}: {s['peak_mib']:.0f} MiB ({s['step_time_s']:.1f} s)"
                          for i, s in enumerate(r["steps"]))
        print(f"{r['route']:>6}: baseline RSS {r['steps'][0]['baseline_mib']:.0f} MiB; peak above it: {steps}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
