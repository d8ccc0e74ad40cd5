"""Verifiable rewards, one number per completion."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import List, Optional, Sequence

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_number(text: str) -> Optional[str]:
    """The last number in ``text`` (commas dropped), or None. "-12", "3.5", "1,024", "3/4"."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _as_fraction(s: str) -> Optional[Fraction]:
    try:
        return Fraction(s.replace(",", "").strip())
    except (ValueError, ZeroDivisionError):
        return None


def answers_match(pred: Optional[str], answer: str) -> bool:
    """Exact comparison: numerically when both parse as numbers, else as stripped strings."""
    if pred is None:
        return False
    a, b = _as_fraction(pred), _as_fraction(answer)
    if a is not None and b is not None:
        return a == b
    return pred.strip() == answer.strip()


def correctness_rewards(completions: Sequence[str], answers: Sequence[str]) -> List[float]:
    """1.0 when the last number of the completion equals the answer exactly, else 0.0."""
    return [float(answers_match(extract_number(c), a)) for c, a in zip(completions, answers)]


def format_rewards(completions: Sequence[str], finished: Sequence[bool]) -> List[float]:
    """1.0 when the completion ended by itself (EOS within budget) and contains a number."""
    return [float(bool(f) and extract_number(c) is not None) for c, f in zip(completions, finished)]
