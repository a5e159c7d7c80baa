"""Real long text shipped on every machine (the Python standard library's source) made into chat prompts.

Used by tests, benchmarks and the calibration: deterministic, no downloads, exact token lengths.
"""

from __future__ import annotations

import random
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Any

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


def chat_input_ids(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` in the model's chat template (transformers 5 returns a BatchEncoding)."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def follow_up_ids(tokenizer: Any, question: str) -> list[int]:
    """Tokens that close an assistant reply generated without its end token and ask ``question`` (the
    bundled model's ChatML turn boundary): appended to a turn's prompt + output, they make the next prompt,
    which shares the whole previous turn as a radix-cache prefix."""
    text = f"<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
