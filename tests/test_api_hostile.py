"""Seeded hostile requests for the chat API's fuzz test (``test_api.test_hostile_requests_get_json_4xx``).

Each category is one attack seen against the API (issue 13): every request here must get a JSON 4xx error.
The tests in this file only check the generator itself (no server), so it stays fast and covers everything.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import quote

CHUNK = 64 * 1024
MiB = 1 << 20


@dataclass
class Hostile:
    kind: str
    method: str
    path: str
    body: bytes | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunked: bool = False  # sent without Content-Length (Transfer-Encoding: chunked)

    def content(self) -> bytes | Iterator[bytes] | None:
        if self.body is None or not self.chunked:
            return self.body
        body = self.body
        return (body[i:i + CHUNK] for i in range(0, len(body), CHUNK))


def _json(obj: Any) -> bytes:
    return json.dumps(obj).encode()


def hostile_requests(seed: int, sid: str, count: int, user: str, admin: str) -> list[Hostile]:
    """``count`` requests drawn with ``seed`` over every category; ``sid`` is a real session of ``user``."""
    rng = random.Random(seed)
    hi = [{"role": "user", "content": "hi"}]

    def auth(key: str | None) -> list[tuple[bytes, bytes]]:
        return [(b"Authorization", f"Bearer {key}".encode())] if key else []

    def chat(kind: str, body: bytes, *extra: tuple[bytes, bytes]) -> Hostile:
        return Hostile(kind, "POST", "/v1/chat/completions", body, [*auth(user), *extra])

    def put_admin(kind: str, body: bytes) -> Hostile:
        return Hostile(kind, "PUT", "/admin/offload", body, auth(admin))

    def invalid_utf8() -> Hostile:
        raw = bytearray(_json({"messages": [{"role": "user", "content": "x" * rng.randint(0, 40)}], "session_id": sid}))
        at = rng.randrange(len(raw))
        raw[at:at] = rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\x80", b"\xe2\x82"])
        return chat("invalid_utf8", bytes(raw))

    def deep_nesting() -> Hostile:
        depth = rng.choice([65, 300, 5000, 100_000])
        opener, closer = rng.choice([("[", "]"), ('{"a":', "}")])
        nest = (opener * depth + "1" + closer * depth if rng.random() < 0.5 else opener * depth).encode()
        where = rng.choice(["top", "field", "schema", "admin"])
        if where == "admin":
            return put_admin("deep_nesting", nest)
        if where == "top":
            return chat("deep_nesting", nest)
        inner = b'{"type": "json_schema", "json_schema": {"schema": ' + nest + b"}}" if where == "schema" else nest
        return chat("deep_nesting", b'{"messages": [{"role": "user", "content": "hi"}], "response_format": ' + inner + b"}")

    def huge_number() -> Hostile:
        digits = "9" * rng.choice([4301, 5000, 50_000])
        name = rng.choice(["max_tokens", "temperature", "seed", "top_logprobs", "some_unknown_field", "budget_bytes",
                           "threshold"])
        number = rng.choice([digits, "-" + digits]) if name == "some_unknown_field" else \
            rng.choice([digits, "-" + digits, "1e400", "-1e400", digits + ".5"])
        if name in ("budget_bytes", "threshold"):
            return put_admin("huge_number", f'{{"{name}": {number}}}'.encode())
        return chat("huge_number", f'{{"messages": {json.dumps(hi)}, "session_id": "{sid}", "{name}": {number}}}'.encode())

    def lone_surrogate() -> Hostile:
        lone = rng.choice(["\\ud800", "\\udfff", "\\udbff", "x\\ud83d", "\\ude00y", "\\ud800\\ud800"])
        message = f'{{"role": "user", "content": "hi"}}'
        body = rng.choice([
            f'{{"messages": [{{"role": "user", "content": "a{lone}b"}}]}}',
            f'{{"messages": [{{"role": "user", "content": [{{"type": "text", "text": "{lone}"}}]}}]}}',
            f'{{"messages": [{message}], "model": "{lone}"}}',
            f'{{"messages": [{message}], "stop": ["{lone}"]}}',
            f'{{"messages": [{message}], "user": "{lone}"}}',
            f'{{"messages": [{message}], "session_id": "{lone}"}}',
            f'{{"messages": [{{"role": "{lone}", "content": "hi"}}]}}',
            f'{{"messages": [{message}], "{lone}": 1}}',
        ])
        return chat("lone_surrogate", body.encode())

    def foreign_session_id() -> Hostile:
        bad = rng.choice([sid + ":turns", sid + ":lock", sid + ":idem:x", sid + ":", "sess_" + "A" * 31,
                          "sess_" + "A" * 33, "x" * 500_000, "../../etc/passwd", "sess_" + "é" * 32, "", " ", "*",
                          sid.upper(), sid[:-1] + "/"])
        how = rng.choice(["chat", "get", "delete", "png"])
        if how == "chat":
            return chat("foreign_session_id", _json({"messages": hi, "session_id": bad}))
        path = f"/v1/sessions/{quote(bad[:4000], safe='') or '%20'}" + ("/layers.png" if how == "png" else "")
        return Hostile("foreign_session_id", "DELETE" if how == "delete" else "GET", path, None, auth(user))

    def wrong_type() -> Hostile:
        name, value = rng.choice([
            ("max_tokens", True), ("max_tokens", "8"), ("max_tokens", 8.5), ("max_tokens", -1), ("max_tokens", 0),
            ("max_tokens", 10 ** 6), ("max_completion_tokens", False), ("temperature", "hot"), ("temperature", -0.1),
            ("temperature", 2.5), ("top_p", 0), ("top_p", 1.5), ("stream", "yes"), ("stream", 1), ("messages", None),
            ("messages", "hi"), ("messages", [None]), ("messages", [{"role": "user"}]), ("messages", [{"content": "x"}]),
            ("messages", [{"role": "tool", "content": "x"}]), ("messages", [{"role": "user", "content": 5}]),
            ("messages", [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
            ("messages", []), ("stop", 5), ("stop", [1, 2]), ("logprobs", "true"), ("top_logprobs", 21),
            ("presence_penalty", 3), ("frequency_penalty", -3), ("seed", 2 ** 64), ("seed", "1"), ("session_id", 5),
            ("response_format", {"type": "xml"}), ("response_format", {"type": "json_schema"}),
            ("response_format", "json"), ("stream_options", {"include_usage": "yes"}), ("model", "m" * 300),
            ("n", 0), ("n", True),
        ])
        return chat("wrong_type", _json({"messages": hi, name: value}))

    def refused_field() -> Hostile:
        extra = rng.choice([
            {"n": 3}, {"tools": [{"type": "function", "function": {"name": "f"}}]}, {"tool_choice": "auto"},
            {"logit_bias": {"5": 10}}, {"functions": [{"name": "f"}]}, {"audio": {"voice": "x"}},
            {"modalities": ["audio"]}, {"store": True}, {"reasoning_effort": "high"},
            {"prediction": {"type": "content", "content": "x"}}, {"seed": 5, "temperature": 0.7},
            {"top_logprobs": 2}, {"max_tokens": 5, "max_completion_tokens": 6}, {"stop": ["a", "b", "c", "d", "e"]},
            {"stop": [""]}, {"stop": "x" * 300},
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wizard"}}}},
        ])
        return chat("refused_field", _json({"messages": hi, **extra}))

    def admin_abuse() -> Hostile:
        key = rng.choice([user, "not-a-key", None, admin])
        value = rng.choice([{"threshold": 0}, {"threshold": -1}, {"threshold": 3}, {"threshold": "0.5"},
                            {"threshold": True}, {"budget_bytes": -1}, {"budget_bytes": True}, {"budget_bytes": 1.5},
                            {"budget_bytes": "1"}, {"budget_bytes": 1 << 60}, {"bogus": 1}, [], "x", {"threshold": [0.5]}])
        if key == user:  # a valid value: refused only because a user key is not an admin key
            return Hostile("admin_abuse", rng.choice(["GET", "PUT"]), "/admin/offload", _json({"threshold": 0.5}), auth(key))
        return Hostile("admin_abuse", "PUT", "/admin/offload", _json(value), auth(key))

    def unknown_route() -> Hostile:
        method, path = rng.choice([
            ("GET", "/v1/chat/completions"), ("DELETE", "/v1/models"), ("PATCH", "/admin/offload"), ("GET", "/v1/nope"),
            ("GET", "/docs"), ("GET", "/openapi.json"), ("POST", "/healthz"), ("PUT", "/v1/sessions"),
            ("GET", "/" + "a" * 5000), ("OPTIONS", "/v1/chat/completions"), ("POST", "/v1/completions"),
            ("POST", "/v1/embeddings"), ("GET", "/admin"), ("DELETE", "/v1/sessions"), ("TRACE", "/v1/models")])
        return Hostile("unknown_route", method, path, None, auth(user))

    def oversized() -> Hostile:
        body = b'{"messages": [{"role": "user", "content": "' + b"x" * (MiB + rng.choice([1, 100, 70_000])) + b'"}]}'
        path = rng.choice(["/v1/chat/completions", "/admin/offload"])
        method = "POST" if path.startswith("/v1") else "PUT"
        return Hostile("oversized", method, path, body, auth(admin if method == "PUT" else user), chunked=rng.random() < 0.7)

    def malformed_json() -> Hostile:
        return chat("malformed_json", rng.choice([
            b"", b"{", b"}", b"[]", b'"x"', b"5", b"null", b"true", b'{"messages": NaN}', b'{"messages": Infinity}',
            b'{"messages": [{"role": "user", "content": "hi"}]} trailing', b"{'a': 1}", b'{"a":}', b"\x00\x01",
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', b"\xef\xbb\xbf{}",
            b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}', b'{"messages": "\\x"}']))

    def bad_header() -> Hostile:
        key = rng.choice([b"x" * 256, b"a b", b"\xc3\xa9", b"\x7f", b"key\x01"])
        return chat("bad_header", _json({"messages": hi, "session_id": sid}), (b"Idempotency-Key", key))

    def bad_auth() -> Hostile:
        value = rng.choice([b"Bearer", b"Basic abc", b"Bearer " + b"k" * 10_000, b"bearer nope", b"Token " + user.encode(),
                            b"Bearer \xc3\xa9"])
        method, path = rng.choice([("POST", "/v1/sessions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
                                   ("GET", f"/v1/sessions/{sid}")])
        return Hostile("bad_auth", method, path, _json({"messages": hi}), [(b"Authorization", value)])

    makers: list[Callable[[], Hostile]] = [
        invalid_utf8, deep_nesting, huge_number, lone_surrogate, foreign_session_id, wrong_type, refused_field,
        admin_abuse, unknown_route, oversized, malformed_json, bad_header, bad_auth]
    return [rng.choice(makers)() for _ in range(count)]


def test_generator_is_seeded_and_covers_every_category():
    one = hostile_requests(13, "sess_" + "A" * 32, 320, "u", "a")
    assert [(h.kind, h.path, h.body) for h in one] == [(h.kind, h.path, h.body) for h in hostile_requests(
        13, "sess_" + "A" * 32, 320, "u", "a")]
    assert len({h.kind for h in one}) == 13
    assert any(h.chunked for h in one) and any(h.kind == "oversized" and not h.chunked for h in one)
