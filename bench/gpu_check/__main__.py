"""`python -m bench.gpu_check`: TRITON_INTERPRET is set for a dry run before anything imports the kernels."""

import os
import sys

if "--dry-run" in sys.argv[1:]:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["LG_TEST_DEVICE"] = "cpu"

from . import main  # noqa: E402

sys.exit(main())
