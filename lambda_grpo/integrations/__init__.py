"""Adapters that put lambda_grpo's losses inside the RL engines people already scale with.

Importing this package imports no engine. Each adapter is its own module, imports its engine lazily
or not at all (importing it never fails where the engine is not installed), and needs its engine to
run:

- ``lambda_grpo.integrations.trl``: ``LambdaGRPOConfig`` / ``LambdaGRPOTrainer`` on TRL's
  ``GRPOTrainer`` (``pip install "lambda-grpo[trl]"``).
- ``lambda_grpo.integrations.verl``: the ``"lambda_grpo"`` policy loss registered in verl through a
  ``verl.plugins`` entry point (``pip install "lambda-grpo[verl]"``).

See docs/integrations.md.
"""
