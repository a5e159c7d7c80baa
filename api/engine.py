"""The engine behind the API: the in-process ``sglang.Engine`` or a remote worker/router, plus the tokenizer.

Chat templates and tokenisation run on one worker thread, never on the event loop: a long conversation or a
1 MiB prompt takes the loop for up to a second, during which no other client is answered (one thread, because
a Hugging Face fast tokenizer is not safe to share between threads).
"""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator

from slkv_sglang.config import HOST_BUDGET

from .errors import ApiError, EngineUnavailable, clip
from .store import Session

ROUTING_HEADER = "X-SMG-Routing-Key"


@dataclass(frozen=True)
class Generation:
    """One generation request: token ids in, SGLang sampling parameters, and the logprobs wanted."""

    ids: list[int]
    params: dict[str, Any]
    stream: bool
    top_logprobs: int | None = None  # None: no logprobs; 0: the chosen tokens' only
    routing_key: str | None = None  # the session id: pins a session to one worker behind a router


class EngineClient:
    """The in-process ``sglang.Engine`` plus what the API needs from its tokenizer."""

    def __init__(self, engine: Any, tokenizer: Any, context_len: int):
        self.engine, self.tokenizer, self.context_len = engine, tokenizer, context_len
        self._tokenizing = ThreadPoolExecutor(max_workers=1, thread_name_prefix="slkv-tokenize")

    def render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def prompt_ids(self, session: Session | None, new: list[dict[str, str]]) -> list[int]:
        """The turn's prompt token ids, computed on the tokenizer thread."""
        loop = asyncio.get_running_loop()
        if session is None:
            return await loop.run_in_executor(self._tokenizing, lambda: self.encode(self.render(new, True)))
        return await loop.run_in_executor(self._tokenizing, turn_ids, self, session, new)

    def token_texts(self, ids: list[int]) -> list[str]:
        return [self.tokenizer.decode([i]) for i in ids]

    def decoded_length(self, ids: list[int]) -> int:
        return len(self.tokenizer.decode(ids, skip_special_tokens=True))

    async def generate(self, gen: Generation) -> AsyncIterator[dict[str, Any]]:
        """SGLang's outputs for ``gen``: cumulative text, output ids and logprobs, one per step when streaming."""
        logprobs = {"return_logprob": True, "top_logprobs_num": gen.top_logprobs} if gen.top_logprobs is not None else {}
        try:
            result = await self.engine.async_generate(input_ids=gen.ids, sampling_params=gen.params, stream=gen.stream,
                                                      **logprobs)
        except ValueError as exc:  # SGLang's request validation, e.g. a JSON schema its grammar backend rejects
            raise ApiError(400, "invalid_request", f"the engine refused the request: {clip(str(exc), 200)}") from exc
        if not gen.stream:
            yield result
            return
        async for chunk in result:
            yield chunk

    async def set_host_budget(self, nbytes: int) -> bool:
        """The engine's host budget through SGLang's admin channel (the plugin's update handler); False: refused
        (an engine without --slkv-offload has no host tier)."""
        from sglang.srt.managers.io_struct import SetInternalStateReq

        answers = await self.engine.tokenizer_manager.set_internal_state(SetInternalStateReq(server_args={HOST_BUDGET: nbytes}))
        return bool(answers) and all(answers)


class RemoteEngineClient(EngineClient):
    """A separate ``sglang.launch_server`` (with the plugin) reached over its native ``/generate`` API."""

    def __init__(self, url: str, tokenizer: Any, context_len: int, admin_key: str | None = None):
        super().__init__(None, tokenizer, context_len)
        self.url, self.admin_key = url.rstrip("/"), admin_key

    async def generate(self, gen: Generation) -> AsyncIterator[dict[str, Any]]:
        import httpx

        body: dict[str, Any] = {"input_ids": gen.ids, "sampling_params": gen.params, "stream": gen.stream}
        if gen.top_logprobs is not None:
            body.update(return_logprob=True, top_logprobs_num=gen.top_logprobs)
        # sglang-router's `manual` policy pins each X-SMG-Routing-Key value to one worker (docs/operations.md).
        headers = {ROUTING_HEADER: gen.routing_key} if gen.routing_key else {}
        try:
            async with httpx.AsyncClient(timeout=None, headers=headers) as http:
                if not gen.stream:
                    r = await http.post(f"{self.url}/generate", json=body)
                    r.raise_for_status()
                    yield r.json()
                    return
                async with http.stream("POST", f"{self.url}/generate", json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data:") and line[5:].strip() != "[DONE]":
                            yield json.loads(line[5:])
        except httpx.HTTPError as exc:  # nothing is committed: the client may retry the turn
            status = exc.response.status_code if isinstance(exc, httpx.HTTPStatusError) else None
            if status in (400, 422):  # the worker's request validation, as in-process above
                raise ApiError(400, "invalid_request", f"the engine refused the request (HTTP {status})") from exc
            raise EngineUnavailable(f"engine at {self.url} failed: {exc!r}") from exc

    async def set_host_budget(self, nbytes: int) -> bool:
        """``/set_internal_state`` of the worker, with its ``--admin-api-key`` when one is configured here."""
        import httpx

        headers = {"Authorization": f"Bearer {self.admin_key}"} if self.admin_key else {}
        try:
            async with httpx.AsyncClient(timeout=60) as http:
                r = await http.post(f"{self.url}/set_internal_state", headers=headers,
                                    json={"server_args": {HOST_BUDGET: nbytes}})
        except httpx.HTTPError as exc:
            raise EngineUnavailable(f"engine at {self.url} failed: {exc!r}") from exc
        if r.status_code in (401, 403):
            raise EngineUnavailable(f"engine at {self.url} refused the admin key (HTTP {r.status_code}): set "
                                    "--sglang-admin-key to the worker's --admin-api-key")
        if r.status_code == 404:  # sglang-router forwards generate requests, not admin ones
            raise EngineUnavailable(f"{self.url} has no /set_internal_state (a router?): set the budget on each "
                                    "worker (docs/operations.md)")
        if r.status_code != 200:
            raise EngineUnavailable(f"engine at {self.url} answered HTTP {r.status_code} to /set_internal_state")
        try:
            answers = r.json()
        except ValueError:
            raise EngineUnavailable(f"engine at {self.url} answered /set_internal_state with no JSON") from None
        return isinstance(answers, list) and bool(answers) and all(a is True for a in answers)


def turn_ids(client: EngineClient, session: Session, new: list[dict[str, str]]) -> list[int]:
    """Token ids of the conversation with ``new`` appended, reusing the stored ids token for token."""
    history = session.history
    messages = history["messages"] + new
    full = client.render(messages, generation_prompt=True)
    if not history["ids"]:
        return client.encode(full)
    before_reply = client.render(history["messages"][:-1], generation_prompt=True) + history["messages"][-1]["content"]
    suffix = full[len(before_reply):]
    if history.get("ended_with_eos") and suffix.startswith(history["eos_text"]):
        suffix = suffix[len(history["eos_text"]):]
    return history["ids"] + client.encode(suffix)
