"""Webhooks for quota alerts: signed POSTs, retried with exponential backoff.

File format (YAML; the worker reads it at start, see docs/quotas.md)::

    webhooks:
      - name: billing-ops                      # unique; recorded with every attempt
        url: https://ops.example.com/hooks/tokenmeter
        secret_env: TOKENMETER_WEBHOOK_BILLING_OPS   # env var holding the HMAC secret
        kinds: [threshold, exhausted]          # optional; default: all
        tenants: [tn-cmcc-0001]                # optional; default: all
        timeout_s: 5                           # optional
        max_attempts: 8                        # optional
        backoff_s: 1                           # first retry after 1 s, then 2, 4, ... s
        max_backoff_s: 300

Each delivery is ``POST url`` with the alert JSON as body and the headers
``X-Tokenmeter-Signature: sha256=<hex HMAC-SHA256 of the body with the secret>``,
``X-Tokenmeter-Event-Id`` (de-duplicate on it) and ``X-Tokenmeter-Attempt``. A 2xx
answer is success; 408, 429, 5xx, timeouts and connection errors are retried; other
4xx answers are final. Every attempt is a row in ``webhook_deliveries``.

The secret is read from the environment variable the file names, because only the file
knows that name (the one exception to "settings read the environment"); it is never
logged or written anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.quota.alerts import encode_alert
from pipeline.settings import SettingsError

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Tokenmeter-Signature"
RETRYABLE = {408, 429}


class WebhookConfigError(SettingsError):
    """The webhooks file is unreadable or invalid, or a secret is missing (a settings
    error: the CLI reports it in one line)."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=64)
    url: str = Field(pattern=r"^https?://")
    secret_env: str = Field(pattern=r"^[A-Z_][A-Z0-9_]*$")
    kinds: list[str] | None = None
    tenants: list[str] | None = None
    timeout_s: float = Field(default=5.0, gt=0, le=60)
    max_attempts: int = Field(default=8, ge=1, le=100)
    backoff_s: float = Field(default=1.0, gt=0, le=3600)
    max_backoff_s: float = Field(default=300.0, gt=0, le=86_400)


class _File(BaseModel):
    model_config = ConfigDict(extra="forbid")

    webhooks: list[_Spec] = Field(default_factory=list)


@dataclass(frozen=True)
class Webhook:
    """One configured webhook, with its secret resolved."""

    name: str
    url: str
    secret: bytes
    kinds: frozenset[str] | None
    tenants: frozenset[str] | None
    timeout_s: float
    max_attempts: int
    backoff_s: float
    max_backoff_s: float

    def __repr__(self) -> str:  # never show the secret
        return f"Webhook({self.name!r}, {safe_url(self.url)!r})"

    def wants(self, alert: dict[str, Any]) -> bool:
        """Whether this alert goes to this webhook."""
        if self.kinds is not None and alert["kind"] not in self.kinds:
            return False
        return self.tenants is None or alert["tenant_id"] in self.tenants

    def delay(self, attempt: int) -> float:
        """Seconds before attempt ``attempt + 1``."""
        return float(min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)))


def safe_url(url: str) -> str:
    """The URL without user info, query or fragment (safe to log and store)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def load_webhooks(path: Path | None, environ: dict[str, str] | None = None) -> list[Webhook]:
    """Read the webhooks file (``None`` or a missing file: no webhooks)."""
    if path is None or not path.exists():
        return []
    env = dict(os.environ) if environ is None else environ
    try:
        data = yaml.safe_load(path.read_text()) or {}
        spec = _File.model_validate(data)
    except yaml.YAMLError as exc:
        raise WebhookConfigError(f"{path.name}: not valid YAML ({exc})") from None
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise WebhookConfigError(f"{path.name}: {where}: {first['msg']}") from None
    names = [w.name for w in spec.webhooks]
    if len(names) != len(set(names)):
        raise WebhookConfigError(f"{path.name}: webhook names must be unique")
    out = []
    for w in spec.webhooks:
        secret = env.get(w.secret_env, "")
        if len(secret) < 16:
            raise WebhookConfigError(
                f"{path.name}: webhook {w.name}: environment variable {w.secret_env} must "
                "hold the signing secret (at least 16 characters)"
            )
        out.append(
            Webhook(
                w.name,
                w.url,
                secret.encode(),
                frozenset(w.kinds) if w.kinds is not None else None,
                frozenset(w.tenants) if w.tenants is not None else None,
                w.timeout_s,
                w.max_attempts,
                w.backoff_s,
                w.max_backoff_s,
            )
        )
    return out


def sign(secret: bytes, body: bytes) -> str:
    """The signature header's value: ``sha256=<hex>``."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


def verify(secret: bytes, body: bytes, header: str) -> bool:
    """What a receiver does: constant-time comparison of the header with the body's
    signature."""
    return hmac.compare_digest(sign(secret, body), header)


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt, as recorded in ``webhook_deliveries``."""

    event_id: str
    webhook: str
    url: str
    attempt: int
    status: str  # ok | retry | failed
    http_status: int | None
    error: str
    duration_ms: float
    attempted_at: datetime
    next_attempt_at: datetime | None

    def row(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "webhook": self.webhook,
            "url": self.url,
            "attempt": self.attempt,
            "status": self.status,
            "http_status": self.http_status,
            "error": self.error,
            "duration_ms": self.duration_ms,
            "attempted_at": self.attempted_at,
            "next_attempt_at": self.next_attempt_at,
        }


class WebhookDispatcher:
    """Delivers alerts to the webhooks that want them, in the event loop.

    ``record(attempt)`` is called for every attempt (the service batches them into
    ``webhook_deliveries``)."""

    def __init__(self, hooks: list[Webhook], record: Callable[[Attempt], None]) -> None:
        self.hooks = {h.name: h for h in hooks}
        self._record = record
        self._session: Any = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._timers: set[asyncio.TimerHandle] = set()
        self._closed = False

    def submit(self, alert: dict[str, Any], next_attempt: dict[str, int] | None = None) -> None:
        """Start delivering ``alert`` to every webhook that wants it. ``next_attempt``
        maps webhook names to the attempt to continue with (after a restart); a name
        missing from it starts at 1, unless the mapping is given and lacks it."""
        for hook in self.hooks.values():
            if not hook.wants(alert):
                continue
            if next_attempt is not None:
                if hook.name not in next_attempt:
                    continue
                attempt = next_attempt[hook.name]
            else:
                attempt = 1
            self._spawn(hook, alert, attempt)

    def _spawn(self, hook: Webhook, alert: dict[str, Any], attempt: int) -> None:
        if self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._deliver(hook, alert, attempt))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _session_get(self) -> Any:
        if self._session is None:
            import aiohttp

            self._session = aiohttp.ClientSession()
        return self._session

    async def _deliver(self, hook: Webhook, alert: dict[str, Any], attempt: int) -> None:
        import aiohttp

        body = encode_alert(alert)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "tokenmeter-quota/1",
            SIGNATURE_HEADER: sign(hook.secret, body),
            "X-Tokenmeter-Event-Id": alert["event_id"],
            "X-Tokenmeter-Attempt": str(attempt),
        }
        started = time.monotonic()
        at = datetime.now(tz=UTC)
        http_status: int | None = None
        error = ""
        session = await self._session_get()
        try:
            async with session.post(
                hook.url,
                data=body,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=hook.timeout_s),
                allow_redirects=False,
            ) as resp:
                http_status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        duration = (time.monotonic() - started) * 1000
        if http_status is not None and 200 <= http_status < 300:
            status = "ok"
        elif http_status is not None and 400 <= http_status < 500 and http_status not in RETRYABLE:
            status = "failed"
            error = error or f"HTTP {http_status}"
        elif attempt >= hook.max_attempts:
            status = "failed"
            error = error or f"HTTP {http_status}"
        else:
            status = "retry"
            error = error or f"HTTP {http_status}"
        delay = hook.delay(attempt) if status == "retry" else None
        next_at = (
            datetime.fromtimestamp(at.timestamp() + delay, tz=UTC) if delay is not None else None
        )
        self._record(
            Attempt(
                alert["event_id"],
                hook.name,
                safe_url(hook.url),
                attempt,
                status,
                http_status,
                error,
                round(duration, 3),
                at,
                next_at,
            )
        )
        if status == "failed":
            log.warning("webhook %s gave up on %s: %s", hook.name, alert["event_id"], error)
        if delay is not None and not self._closed:
            handle = asyncio.get_running_loop().call_later(
                delay, self._spawn, hook, alert, attempt + 1
            )
            self._timers.add(handle)

    async def close(self) -> None:
        self._closed = True
        for handle in self._timers:
            handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
