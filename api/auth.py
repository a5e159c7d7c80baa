"""Bearer keys: user keys (``SLKV_API_KEYS``) run chat turns and own sessions; admin keys (``SLKV_ADMIN_KEYS``)
change server settings. A user key is never an admin: settings apply to every user's turns."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from .errors import ApiError


def bearer(request: Request) -> str:
    auth = request.headers.get("authorization", "")
    return auth[7:] if auth.lower().startswith("bearer ") else ""


@dataclass(frozen=True)
class Keys:
    users: frozenset[str] = frozenset()  # empty: no authentication (local quick start)
    admins: frozenset[str] = frozenset()

    def user(self, request: Request) -> str:
        """The owner of the request's sessions: its key, or "anonymous" without authentication."""
        if not self.users:
            return "anonymous"
        key = bearer(request)
        if key not in self.users:
            raise ApiError(401, "unauthorized", "missing or unknown API key")
        return key

    def admin(self, request: Request) -> None:
        """Admin keys only; with no keys configured at all (quick start) the admin routes are open too."""
        if not self.users and not self.admins:
            return
        key = bearer(request)
        if key in self.admins:
            return
        if key in self.users:
            raise ApiError(403, "forbidden", "this endpoint needs an admin key (SLKV_ADMIN_KEYS)")
        raise ApiError(401, "unauthorized", "missing or unknown admin key")
