"""Real long text shipped on every machine (the Python standard library's source) made into chat prompts.

Used by tests, benchmarks and the calibration: deterministic, no downloads, exact token lengths.
"""

from __future__ import annotations

import random
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

from .model import chat_input_ids

_MARK = "\x00DOC\x00"


@lru_cache(maxsize=1)
def stdlib_sources() -> tuple[Path, ...]:
    """Pure-Python stdlib modules, sorted, large enough to fill a long prompt."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return tuple(sorted(p for p in root.glob("*.py") if p.stat().st_size > 20_000))


def document(seed: int, min_chars: int) -> str:
    """Concatenate randomly chosen (seeded) stdlib files until ``min_chars`` characters."""
    rng = random.Random(seed)
    files = list(stdlib_sources())
    rng.shuffle(files)
    parts: list[str] = []
    size = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(f"# file: {path.name}\n{text}")
        size += len(text)
        if size >= min_chars:
            break
    return "\n".join(parts)


def prompt_ids(tokenizer: Any, n_tokens: int, seed: int, question: str) -> list[int]:
    """Chat-template prompt of exactly ``n_tokens`` ids: a stdlib document cut to fit, then ``question``."""
    frame = chat_input_ids(tokenizer, [{"role": "user", "content": f"{_MARK}\n\n{question}"}])
    mark = tokenizer(_MARK, add_special_tokens=False)["input_ids"]
    at = next(i for i in range(len(frame)) if frame[i : i + len(mark)] == mark)
    head, tail = frame[:at], frame[at + len(mark) :]
    budget = n_tokens - len(head) - len(tail)
    if budget <= 0:
        raise ValueError(f"{n_tokens} tokens leave no room for a document")
    doc = tokenizer(document(seed, min_chars=budget * 6), add_special_tokens=False)["input_ids"]
    if len(doc) < budget:
        raise ValueError(f"document for seed {seed} has {len(doc)} tokens, {budget} needed")
    return head + doc[:budget] + tail
