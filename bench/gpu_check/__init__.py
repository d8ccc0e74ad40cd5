"""GPU acceptance run in one command: ``python -m bench.gpu_check [--out DIR]`` (``make gpu-check``, needs CUDA).

Sections (one module each), each guarded (an exception becomes a FAIL row and the run goes on)
and each with a time budget inside a deadline for the whole run, so that it ends within 8 minutes
on an H100/H200 (docs/gpu.md has the estimate per section, `--estimate` prints it):

1. device   GPU facts, versions, the code under test, and the measured device-to-device copy
            bandwidth (device.py).
2. correct  backend="triton" (compiled kernels) and backend="torch" against the float64 reference
            on the card: the grid of run 1, every surrogate, GSPO, packed inputs (cu_seqlens),
            long rows of 65 536 tokens; the scalar rule over one-ulp moves; and in a subprocess
            pytest tests/test_triton.py tests/test_triton_int64.py on CUDA (correct.py).
3. compile  torch.compile(fullgraph=True) of a GRPOLoss(backend="triton") step (capture.py).
4. graph    one fwd+bwd step in a CUDA graph: host syncs counted, capture, replays with new
            advantages, lambda, mask and logits equal to eager, replay time at small N (capture.py).
5. timing   logits route fwd+bwd, N in {2048, 16 384, 65 536} x V in {32 000, 151 936}: ours fused
            and two-pass, in place and not, Liger's triton_grpo_loss, TRL, eager torch; % of the
            copy bandwidth under the byte model of bench/gpu_model.py (checked against the kernels
            by counting under the interpreter); a profile of one step of each of ours (timing.py).
6. hidden   fused_linear_grpo_loss: correctness vs float64, and fwd+bwd at N in {4096, 16 384} x
            H in {896, 2048}, V = 151 936 against Liger's LigerFusedLinearGRPOLoss, TRL 1.16's
            chunked LM head + our grpo_loss_from_logprobs and the floor of the three matmuls
            (hidden.py).
7. rows     the Triton row kernel vs the torch row math (rows.py).
Then the report (report.py): gpu_check.csv, gpu_check.md (issue 20's targets first, met or missed
with the measured figure), gpu_check.png, rewritten as rows arrive, so a run cut short keeps what
it measured. Private lambda_grpo modules are used in internals.py only; the code under test is
recorded by provenance.py (a source tree hash, and a stamp written before shipping).

``--dry-run``: the same code path on the CPU under TRITON_INTERPRET=1 at tiny sizes; times come
from time.perf_counter (labelled), memory from the process RSS; what truly needs CUDA (GPU facts,
the CUDA profiler, CUDA graph capture, inductor) is skipped or replaced, with a printed reason.
tests/test_gpu_check.py runs it.

Exit status: 0 when no row is FAIL (ERROR rows, a peer library failing, are listed but do not
fail the run), 1 otherwise, 2 when CUDA is absent and --dry-run was not given.
"""


def main(argv=None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else list(argv)
    if args[:1] in (["--stamp"], ["--find-commit"]):  # git and python only: no torch needed
        from .provenance import cli

        return cli(args)
    from .main import main as _main

    return _main(args)
