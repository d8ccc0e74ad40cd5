"""Adapters that run lambda_grpo's losses inside other training engines (docs/integrations.md).

Each submodule imports its engine lazily or not at all, so that importing it never fails where
the engine is not installed. This package itself imports nothing.
"""
