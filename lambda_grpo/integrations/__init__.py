"""Adapters that put lambda_grpo's losses inside the RL engines people already scale with.

Importing this package imports no engine. Each adapter is its own module and needs its engine:

- ``lambda_grpo.integrations.trl``: ``LambdaGRPOConfig`` / ``LambdaGRPOTrainer`` on TRL's
  ``GRPOTrainer`` (``pip install "lambda-grpo[trl]"``).

See docs/integrations.md.
"""
