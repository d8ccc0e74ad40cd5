"""Measurement children: each memory measurement runs in a fresh process, so that what one
measures (a resident-set high-water mark) carries nothing of another's allocations."""

from __future__ import annotations

import json
import os
import subprocess
from typing import List, Optional, Tuple


def run_child_json(cmd: List[str], mmap_threshold: int = 0) -> Tuple[Optional[dict], str]:
    """Run a measurement child process (`cmd`, e.g. [python, -m, bench.x, --child, ...]) and
    return (the JSON object on its last stdout line, "") or (None, its stderr tail) when it failed.
    mmap_threshold > 0 runs it with MALLOC_MMAP_THRESHOLD_ set, so that glibc maps every block
    above it separately and unmaps it when freed (the resident set then follows the live tensors)."""
    env = dict(os.environ)
    if mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        return None, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1]), ""
