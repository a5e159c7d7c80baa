"""Request bodies: a size limit enforced while reading, and JSON parsing that turns every hostile input into a 400.

Python's ``json`` answers hostile bodies with exceptions a handler would report as 500 (invalid UTF-8 is a
``UnicodeDecodeError``, deep nesting a ``RecursionError``, an integer over 4,300 digits a ``ValueError``) or
accepts them into values that fail later (lone surrogates cannot be encoded when stored or answered; ``NaN``
and ``Infinity`` are not JSON). Everything is checked here, before a value reaches the routes.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import ApiError, clip

MAX_BODY_BYTES = 1 << 20
MAX_DEPTH = 64  # request schemas nest a few levels; JSON schemas in response_format a few dozen at most

_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")

M = TypeVar("M", bound=BaseModel)


def too_large() -> ApiError:
    return ApiError(413, "too_large", f"body over {MAX_BODY_BYTES} bytes")


class BodyLimit:
    """ASGI middleware: a body over MAX_BODY_BYTES is refused by its Content-Length, or, when chunked or
    mislabelled, as soon as the bytes read pass the limit (the route reading it gets a 413).

    A request framed both ways (Content-Length and Transfer-Encoding) is refused before anything reads it: a
    proxy in front that trusts the other header would see a different request boundary (request smuggling).
    The answer closes the connection, as RFC 9112 section 6.3 asks, so no bytes after it are read as a request."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name for name, _ in scope["headers"]}
        if b"content-length" in names and b"transfer-encoding" in names:
            error = ApiError(400, "invalid_request", "both Content-Length and Transfer-Encoding: send one")
            await error.response(headers={"Connection": "close"})(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            error = too_large() if length.isdigit() else ApiError(400, "invalid_request", "bad Content-Length")
            await error.response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                raise too_large()
            return message

        await self.app(scope, limited, send)


def parse_json(raw: bytes) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "invalid_json", "body is not valid UTF-8") from None
    too_deep = ApiError(400, "invalid_json", f"body nests deeper than {MAX_DEPTH} levels")
    constants: list[str] = []

    def constant(name: str) -> Any:  # NaN, Infinity, -Infinity: kept to name where they stood
        constants.append(name)
        return _NOT_JSON

    try:
        value = json.loads(text, parse_constant=constant)
    except RecursionError:
        raise too_deep from None
    except json.JSONDecodeError as exc:
        raise ApiError(400, "invalid_json", f"body is not JSON: {exc.msg} at offset {exc.pos}") from None
    except ValueError:  # int() refuses more than sys.get_int_max_str_digits() digits
        raise ApiError(400, "invalid_json", "a number in the body is too long") from None
    if _depth(value) > MAX_DEPTH:
        raise too_deep
    if constants:
        raise ApiError(400, "invalid_json", f"{_path_to(value, _NOT_JSON)}: {constants[0]} is not JSON")
    if _SURROGATE_ESCAPE.search(text):  # paired escapes decode to one character; lone ones stay surrogates
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "invalid_json", "body has a lone UTF-16 surrogate escape") from None
    return value


def _depth(value: Any) -> int:
    """How deep lists and objects nest in ``value``, level by level (no recursion: it may nest ~1000 deep)."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level:
        depth += 1
        level = [child for node in level for child in (node.values() if isinstance(node, dict) else node)
                 if isinstance(child, (dict, list))]
    return depth


_NOT_JSON = object()


def _path_to(value: Any, target: object) -> str:
    """The field where ``target`` first stands in ``value`` (``slkv.threshold``, ``messages[0].content``),
    level by level like ``_depth``."""
    level: list[tuple[str, Any]] = [("", value)]
    while level:
        below: list[tuple[str, Any]] = []
        for path, node in level:
            if node is target:
                return path or "body"
            if isinstance(node, dict):
                below += [(f"{path}.{clip(k, 30)}" if path else clip(k, 30), v) for k, v in node.items()]
            elif isinstance(node, list):
                below += [(f"{path}[{i}]", v) for i, v in enumerate(node)]
        level = below
    return "body"


def validate(model: type[M], value: Any) -> M:
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        raise ApiError(400, "invalid_request", clip("; ".join(
            f"{'.'.join(clip(str(p), 30) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()), 500)) from None


async def read_model(request: Request, model: type[M]) -> M:
    return validate(model, parse_json(await request.body() or b"{}"))
