"""The ``lambda-grpo`` console script. Sub-commands: ``train`` (the GRPO trainer)."""

from __future__ import annotations

import sys
from typing import List, Optional

USAGE = """usage: lambda-grpo <command> [options]

commands:
  train    train a causal LM with a GRPO-family loss (lambda-grpo train --help)
"""


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a user error: one line, exit code 2 (the usage is for --help)
        print("lambda-grpo: error: expected a command (train); see lambda-grpo --help", file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from .trainer.cli import main as train_main

        return train_main(rest, prog="lambda-grpo train")
    print(f"lambda-grpo: error: unknown command {cmd!r}, expected one of: train (see lambda-grpo --help)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
