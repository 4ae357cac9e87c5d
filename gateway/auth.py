"""API keys, and the short-lived events URLs a browser's EventSource can open.

A task belongs to the key that made it (stored as a hash, never the key itself);
another key gets 404 for it, exactly as for a task that does not exist."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time

from fastapi import Request

from contracts.errors import Unauthorized
from gateway.settings import GatewaySettings


def owner_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


class Auth:
    def __init__(self, settings: GatewaySettings) -> None:
        self.keys = {k.strip() for k in settings.api_keys.split(",") if k.strip()}
        self.ttl = settings.events_token_ttl
        secret = settings.token_secret or (
            "\n".join(sorted(self.keys)) if self.keys else secrets.token_hex(32)
        )
        self._secret = hashlib.sha256(b"timebox-events:" + secret.encode()).digest()

    @property
    def open(self) -> bool:
        return not self.keys

    def caller(self, request: Request) -> str | None:
        """The owner id of the request's API key; None when the API is open."""
        if self.open:
            return None
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("send your API key as 'Authorization: Bearer <key>'")
        key = key.strip()
        for known in self.keys:
            if hmac.compare_digest(known, key):
                return owner_of(known)
        raise Unauthorized("unknown API key")

    def events_token(self, task_id: str, deadline: float | None = None) -> str:
        """A token for the task's events URL, good until `ttl` after its deadline (epoch
        seconds; now if unknown): an EventSource reconnects throughout a long task."""
        expires = int(max(time.time(), deadline or 0.0) + self.ttl)
        return f"{expires}.{self._sign(task_id, expires)}"

    def token_allows(self, task_id: str, token: str) -> bool:
        expires_text, _, signature = token.partition(".")
        # isdigit() also accepts '²' and the like, which int() refuses
        if not (expires_text.isascii() and expires_text.isdigit()):
            return False
        if int(expires_text) < time.time():
            return False
        return hmac.compare_digest(signature, self._sign(task_id, int(expires_text)))

    def _sign(self, task_id: str, expires: int) -> str:
        message = f"{task_id}.{expires}".encode()
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:32]
