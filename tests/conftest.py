"""Test session setup.

SPEC §10: TRITON_INTERPRET=1 must be set before any kernel module is imported; conftest.py
is imported by pytest before the test modules, so setting it here (only when CUDA is absent)
makes backend="triton" run on this CPU machine through the interpreter.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
