"""SGLang outputs in OpenAI's chat completion shapes: completions, stream chunks, usage and logprobs."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from .engine import EngineClient


def sse(obj: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


def finish_reason(out: dict[str, Any]) -> str:
    reason = (out["meta_info"].get("finish_reason") or {}).get("type", "stop")
    return "length" if reason == "length" else "stop"


def usage(out: dict[str, Any]) -> dict[str, Any]:
    meta = out["meta_info"]
    return {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": meta["completion_tokens"],
            "total_tokens": meta["prompt_tokens"] + meta["completion_tokens"],
            "prompt_tokens_details": {"cached_tokens": meta.get("cached_tokens", 0)}}


def content_tokens(client: EngineClient, out: dict[str, Any]) -> int:
    """How many output tokens make the answer's text: not the EOS token, not a matched stop sequence's tokens
    (SGLang trims both from the text but reports their logprobs)."""
    ids = list(out.get("output_ids") or [])
    n = len(ids)
    while n and client.decoded_length(ids[:n - 1]) >= len(out["text"]):
        n -= 1
    return n


def logprob_entries(client: EngineClient, meta: dict[str, Any], start: int, stop: int) -> list[dict[str, Any]]:
    """OpenAI ``logprobs.content`` entries for output tokens [start, stop) from SGLang's (logprob, id, _) lists."""
    chosen = meta.get("output_token_logprobs") or []
    tops = meta.get("output_top_logprobs") or []
    entries = []
    for i in range(start, min(stop, len(chosen))):
        top = tops[i] if i < len(tops) and tops[i] else []
        texts = client.token_texts([int(chosen[i][1])] + [int(t[1]) for t in top])
        entries.append({**_token(texts[0], chosen[i][0]),
                        "top_logprobs": [_token(text, t[0]) for text, t in zip(texts[1:], top)]})
    return entries


def _token(text: str, logprob: float) -> dict[str, Any]:
    # A token that is part of a UTF-8 character decodes to U+FFFD: its bytes are not known here (OpenAI: null).
    return {"token": text, "logprob": logprob, "bytes": None if "\ufffd" in text else list(text.encode())}


def head(model: str) -> dict[str, Any]:
    """What a completion and its stream chunks share: id, creation time, model."""
    return {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": model}


def completion(top: dict[str, Any], text: str, finish: str, use: dict[str, Any],
               logprobs: list[dict[str, Any]] | None, **extra: Any) -> dict[str, Any]:
    return {
        **top, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None},
                     "finish_reason": finish}],
        "usage": use, **extra,
    }


def chunk(top: dict[str, Any], delta: dict[str, Any], finish: str | None = None,
          logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A stream chunk; ``top`` is the completion's head (or the completion)."""
    return {"id": top["id"], "object": "chat.completion.chunk", "created": top["created"], "model": top["model"],
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish,
                         "logprobs": None if logprobs is None else {"content": logprobs, "refusal": None}}]}


def closing_chunks(done: dict[str, Any], include_usage: bool) -> list[bytes]:
    """The finish chunk, the usage chunk if asked for (OpenAI: empty choices), and the end marker."""
    events = [sse(chunk(done, {}, done["choices"][0]["finish_reason"]))]
    if include_usage:
        events.append(sse({**chunk(done, {}), "choices": [], "usage": done["usage"]}))
    return [*events, b"data: [DONE]\n\n"]


def replayed_stream(done: dict[str, Any], include_usage: bool) -> list[bytes]:
    """A stored completion as a stream: all its content in one chunk, then the closing chunks."""
    message, logprobs = done["choices"][0]["message"], done["choices"][0]["logprobs"]
    first = chunk(done, {"role": "assistant", "content": message["content"]},
                  logprobs=None if logprobs is None else logprobs["content"])
    return [sse(first), *closing_chunks(done, include_usage)]
