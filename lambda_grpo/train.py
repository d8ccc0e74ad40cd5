"""``python -m lambda_grpo.train --help``: the GRPO trainer's command line (lambda_grpo.trainer.cli)."""

import sys

from .trainer.cli import main

if __name__ == "__main__":
    sys.exit(main())
