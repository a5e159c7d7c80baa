"""The sessions ``slkv bench-serve`` plays: a long document with a needle, then turns drawn from chat statistics.

A session's first turn is a stdlib document (``corpus.document``) with a planted 5-digit passcode
(``evaluate.needle_case``) and a question about the code; the middle turns paste another excerpt and ask about
it; the last turn asks for the passcode, so every session also checks retrieval. User-turn and reply lengths
are drawn (seeded) around published means; replies are scaled down and capped because decode is slow on CPU.
With the ``random`` filler, documents and pasted excerpts are random tokens instead (the needle and the questions
stay text): a workload whose laziness differs from text's. Built once per run and replayed identically for every
configuration.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from .corpus import document
from .evaluate import NEW_TOKENS, needle_case
from .corpus import follow_up_ids


@dataclass(frozen=True)
class ChatStats:
    """Mean turns per conversation and tokens per user prompt and per reply of a chat data set."""
    turns: float
    prompt_tokens: float
    reply_tokens: float


# LMSYS-Chat-1M paper (Zheng et al., arXiv 2309.11998), Table 1: LMSYS-Chat-1M 2.0 turns per conversation,
# 69.5 tokens per user prompt, 214.5 per response; ShareGPT in the same table 3.5, 94.9, 348.5. Only the
# means are used. Not checked against the paper here: the search tool found the paper but not its table's text.
STATS = {"lmsys": ChatStats(2.0, 69.5, 214.5), "sharegpt": ChatStats(3.5, 94.9, 348.5)}

QUESTIONS = ["Summarise the code above in one sentence.", "Which function above is the longest?",
             "What does the first class above do?", "Is there any error handling above? Where?",
             "Which modules does the code above import?", "Name two functions above that could be merged."]
FILLERS = ("text", "random")  # what documents and pasted excerpts are made of
MAX_USER_TOKENS = 512  # a drawn prompt length's cap (the exponential's tail would paste whole files)


@dataclass(frozen=True)
class Turn:
    ids: list[int]  # what the turn appends to the session's history (turn 1: the whole first prompt)
    reply_tokens: int


@dataclass(frozen=True)
class Session:
    name: str
    turns: tuple[Turn, ...]
    passcode: str  # asked for by the last turn; "" for none (serve_driver then checks no needle)
    start: float  # seconds after the run's start at which the session sends its first turn


@dataclass(frozen=True)
class Workload:
    doc_tokens: int
    turns: int
    stats: str
    reply_scale: float
    reply_cap: int
    rate: float | None  # sessions per second (Poisson arrivals); None: all start at once
    seed: int
    filler: str = "text"  # FILLERS


def _exponential(rng: random.Random, mean: float, low: int, high: int) -> int:
    """A length around ``mean`` (exponential: only the mean is published), clipped to [low, high]."""
    return max(low, min(high, round(rng.expovariate(1.0 / mean))))


def random_ids(tokenizer: Any, n: int, seed: int) -> list[int]:
    """``n`` random token ids (seeded), none of them a special token."""
    rng, special = random.Random(seed), set(tokenizer.all_special_ids)
    out: list[int] = []
    while len(out) < n:
        token = rng.randrange(len(tokenizer))
        if token not in special:
            out.append(token)
    return out


def _user_turn(tokenizer: Any, rng: random.Random, tokens: int, seed: int, filler: str) -> list[int]:
    """A follow-up of about ``tokens`` tokens: a pasted excerpt (of another stdlib document, or random tokens)
    and a question."""
    question = rng.choice(QUESTIONS)
    room = tokens - len(tokenizer(question, add_special_tokens=False)["input_ids"])
    if filler == "random":
        excerpt = random_ids(tokenizer, max(room, 0), seed)
    else:
        excerpt = tokenizer(document(seed, min_chars=max(room, 1) * 6), add_special_tokens=False)["input_ids"][:room]
    text = f"{tokenizer.decode(excerpt)}\n\n{question}" if room > 0 else question
    return follow_up_ids(tokenizer, text)


def build_sessions(tokenizer: Any, count: int, w: Workload) -> list[Session]:
    """``count`` sessions; the first n of them are the same whatever ``count`` is (a sweep adds sessions)."""
    stats = STATS[w.stats]
    reply_mean = stats.reply_tokens * w.reply_scale
    arrivals = random.Random(w.seed)
    start = 0.0
    sessions = []
    for i in range(count):
        rng = random.Random(w.seed * 7919 + i)
        replies = [_exponential(rng, reply_mean, 1, w.reply_cap) for _ in range(w.turns - 1)]
        replies.append(NEW_TOKENS)  # the needle's answer: the model repeats the question before the digits
        hay = (lambda n, seed: random_ids(tokenizer, n, seed)) if w.filler == "random" else None
        case = needle_case(tokenizer, w.doc_tokens, depth=rng.uniform(0.1, 0.9), seed=w.seed * 1000 + i,
                           ask=rng.choice(QUESTIONS), hay=hay)
        middle = [_user_turn(tokenizer, rng, _exponential(rng, stats.prompt_tokens, 8, MAX_USER_TOKENS),
                             seed=w.seed * 1000 + 500 + i * 16 + k, filler=w.filler) for k in range(w.turns - 2)]
        ids = [case.input_ids, *middle, follow_up_ids(tokenizer, case.question)]
        sessions.append(Session(f"s{i}", tuple(Turn(t, r) for t, r in zip(ids, replies)), case.answer, start))
        if w.rate:
            start += arrivals.expovariate(w.rate)
    return sessions
