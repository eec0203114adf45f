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
4xx answers and redirects (3xx, never followed) are final. Every attempt is a row in
``webhook_deliveries``, with the URL as ``scheme://host:port/…``: user info, path and
query may hold a secret, and analysts read that table.

Webhooks to addresses that are not public (loopback, private, link-local, unique-local,
``0.0.0.0/8``, ...) are refused unless ``TOKENMETER_WEBHOOK_ALLOW_PRIVATE=true``: a URL
whose host is such an address (or ``localhost``) when the file is read, and a host name
that resolves to one at each delivery (every address it resolves to is checked, by the
resolver the connection then uses, so DNS cannot point a public name at an internal
service in between). A refused delivery is a ``failed`` row whose error says why.

The secret is read from the environment variable the file names, because only the file
knows that name (the one exception to "settings read the environment"); it is never
logged or written anywhere.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

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


class PrivateAddressError(OSError):
    """A webhook's host is, or resolves to, an address that is not public."""


ALLOW_PRIVATE_SETTING = "TOKENMETER_WEBHOOK_ALLOW_PRIVATE"


def is_public_address(address: str) -> bool:
    """Whether ``address`` (an IPv4 or IPv6 literal) is a public unicast address: not
    loopback, private (10/8, 172.16/12, 192.168/16, fc00::/7), link-local (169.254/16,
    fe80::/10), ``0.0.0.0/8``, shared, reserved or multicast. An IPv4 address mapped
    into IPv6 (``::ffff:127.0.0.1``) is judged as the IPv4 address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def host_refusal(url: str) -> str:
    """Why ``url`` is refused without resolving its host: the host is an address that is
    not public, or ``localhost``; "" otherwise (a name is checked when it resolves)."""
    host = (urlsplit(url).hostname or "").rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return (
            f"host {host} is this machine (loopback); set {ALLOW_PRIVATE_SETTING}=true to allow it"
        )
    try:
        public = is_public_address(host)
    except ValueError:
        return ""  # a name, not an address
    if public:
        return ""
    return (
        f"host {host} is not a public address (loopback, private or link-local); "
        f"set {ALLOW_PRIVATE_SETTING}=true to allow it"
    )


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
    """The URL as ``scheme://host:port/…`` (safe to log and store): user info, path,
    query and fragment may hold a secret (``https://hooks.example/T0/B1/XYZ?token=...``)
    and are dropped; ``/…`` marks that there was a path or query."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # an IPv6 literal
    try:
        port = parts.port
    except ValueError:
        port = None
    if port:
        host = f"{host}:{port}"
    rest = "/…" if parts.path.strip("/") or parts.query or parts.fragment else "/"
    return f"{parts.scheme}://{host}{rest}"


def _scrub(text: str, url: str) -> str:
    """``text`` (an error message) with the URL's secret-bearing parts replaced by the
    safe URL or ``…``."""
    parts = urlsplit(url)
    text = text.replace(url, safe_url(url))
    for secret in (
        parts.path + ("?" + parts.query if parts.query else ""),
        parts.query,
        parts.password or "",
        parts.path,
    ):
        if len(secret) > 1:
            text = text.replace(secret, "…")
    return text


def load_webhooks(
    path: Path | None, environ: dict[str, str] | None = None, allow_private: bool = False
) -> list[Webhook]:
    """Read the webhooks file (``None`` or a missing file: no webhooks). Unless
    ``allow_private``, a URL whose host is an address that is not public (or
    ``localhost``) is an error naming its field (``webhooks.<i>.url``)."""
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
    for i, w in enumerate(spec.webhooks):
        refusal = "" if allow_private else host_refusal(w.url)
        if refusal:
            raise WebhookConfigError(
                f"{path.name}: webhooks.{i}.url (webhook {w.name}, {safe_url(w.url)}): {refusal}"
            )
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

    def __init__(
        self,
        hooks: list[Webhook],
        record: Callable[[Attempt], None],
        allow_private: bool = False,
    ) -> None:
        """``allow_private``: deliver to hosts that are, or resolve to, addresses that
        are not public (``TOKENMETER_WEBHOOK_ALLOW_PRIVATE``); refused otherwise."""
        self.hooks = {h.name: h for h in hooks}
        self._record = record
        self.allow_private = allow_private
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

            connector = (
                None if self.allow_private else aiohttp.TCPConnector(resolver=_public_resolver())
            )
            self._session = aiohttp.ClientSession(connector=connector)
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
        error = "" if self.allow_private else host_refusal(hook.url)
        refused = bool(error)
        if not refused:
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
                private = _cause(exc, PrivateAddressError)
                refused = private is not None
                shown = private if private is not None else exc
                error = _scrub(f"{type(shown).__name__}: {shown}", hook.url)[:500]
        duration = (time.monotonic() - started) * 1000
        if http_status is not None and 200 <= http_status < 300:
            status = "ok"
        elif refused:
            status = "failed"  # a refused address is final: retrying cannot change it
        elif http_status is not None and 300 <= http_status < 400:
            status = "failed"  # never followed: it could lead to an internal address
            error = f"HTTP {http_status}: redirects are not followed"
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


def _cause(exc: BaseException, kind: type[PrivateAddressError]) -> PrivateAddressError | None:
    """The ``kind`` exception in ``exc``'s chain of causes (aiohttp wraps the
    resolver's), or None."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:  # a chain can loop
        if isinstance(current, kind):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _public_resolver() -> Any:
    """An aiohttp resolver that resolves like the default one and raises
    ``PrivateAddressError`` when any address a name resolves to is not public. The
    connection uses exactly the addresses checked here."""
    from aiohttp.abc import AbstractResolver, ResolveResult
    from aiohttp.resolver import DefaultResolver

    class PublicResolver(AbstractResolver):
        def __init__(self) -> None:
            self._inner = DefaultResolver()

        async def resolve(
            self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
        ) -> list[ResolveResult]:
            found = await self._inner.resolve(host, port, family)
            for entry in found:
                if not is_public_address(entry["host"]):
                    raise PrivateAddressError(
                        f"host {host} resolves to {entry['host']}, not a public address; "
                        f"set {ALLOW_PRIVATE_SETTING}=true to allow it"
                    )
            return found

        async def close(self) -> None:
            await self._inner.close()

    return PublicResolver()
