"""The gateway-side quota helper: reserve before a model call, commit after it.

    meter = Meter("http://127.0.0.1:6066", UsageProducer.from_settings(settings))
    with meter.reserve("tn-cmcc-0001", estimated_tu=4000) as r:
        if r.granted == 0:
            ...                       # refuse the call: the quota is exhausted
        answer = call_the_model(max_tokens=...)      # sized to r.granted
        r.commit(actual_tu, event)    # settles the reservation, then sends the event
    producer.flush()

``commit`` first settles the reservation on the worker (with the event's id, so the
worker can match the usage event when it is stored and count it exactly once), then
sends the usage event through the producer. The event is sent even if the quota
service could not be reached: the call has happened and must be metered; the result
says what happened to the reservation. Leaving the ``with`` block without a commit
releases the reservation (and an unreachable service lets it expire after its TTL).

``actual_tu`` may be left out when the Meter has a price book: the event's Token Units
are then computed with the worker's own rules (they depend only on the model and the
token classes, not on plans). Thread-safe: one keep-alive connection per thread.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from dataclasses import dataclass
from decimal import Decimal
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlsplit

from pipeline.events import UsageEvent, check_record, now_ms
from pipeline.metering.pricing import PriceBook, Unpriced
from pipeline.produce import InvalidEventError, UsageProducer

ZERO = Decimal(0)


class QuotaServiceError(Exception):
    """The quota service refused a call or could not be reached. ``status`` is the HTTP
    status (0 when unreachable); the message is the service's."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"quota service: {message}" + (f" (HTTP {status})" if status else ""))
        self.status = status
        self.message = message


@dataclass(frozen=True)
class CommitResult:
    """What a commit did: ``settled`` if the worker settled the reservation (``body`` is
    its answer); the usage event was sent either way (``event_id``)."""

    settled: bool
    event_id: str
    token_units: Decimal
    body: dict[str, Any] | None = None
    error: str | None = None


class Meter:
    """Client of the worker's quota service plus the usage producer."""

    def __init__(
        self,
        base_url: str,
        producer: UsageProducer,
        *,
        timeout_s: float = 2.0,
        price_book: PriceBook | None = None,
        retries_503: int = 3,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"base_url must be http://host:port, not {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or 80
        self.producer = producer
        self.timeout_s = timeout_s
        self.price_book = price_book
        self.retries_503 = retries_503
        self._local = threading.local()

    # ---- HTTP -------------------------------------------------------------------
    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            self._local.conn = conn
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
        self._local.conn = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One JSON call; returns the answer or raises ``QuotaServiceError``."""
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        attempt = 0
        while True:
            attempt += 1
            try:
                conn = self._conn()
                conn.request(method, path, body=data, headers=headers)
                resp = conn.getresponse()
                raw = resp.read()
            except (http.client.HTTPException, OSError) as exc:
                self._drop()
                if attempt == 1:  # a keep-alive connection the server closed: once more
                    continue
                raise QuotaServiceError(0, f"unreachable: {exc}") from None
            try:
                answer: dict[str, Any] = json.loads(raw) if raw else {}
            except ValueError:
                answer = {"error": raw[:200].decode(errors="replace")}
            if resp.status == 503 and attempt <= self.retries_503:
                time.sleep(0.2 * attempt)
                continue
            if resp.status >= 400:
                raise QuotaServiceError(resp.status, str(answer.get("error", resp.reason)))
            return answer

    def status(self, tenant_id: str, subscriber_id: str | None = None) -> dict[str, Any]:
        """``GET /v1/quotas/{tenant}``."""
        path = f"/v1/quotas/{quote(tenant_id, safe='')}"
        if subscriber_id:
            path += f"?subscriber_id={quote(subscriber_id, safe='')}"
        return self.call("GET", path)

    def reserve(
        self,
        tenant_id: str,
        estimated_tu: Decimal | int | str,
        ttl_s: float = 30,
        subscriber_id: str | None = None,
    ) -> Reservation:
        """Reserve up to ``estimated_tu``; use as a context manager. Raises
        ``QuotaServiceError`` (404 when the tenant has no quota)."""
        body: dict[str, Any] = {"token_units": str(estimated_tu), "ttl_s": ttl_s}
        if subscriber_id is not None:
            body["subscriber_id"] = subscriber_id
        answer = self.call("POST", f"/v1/quotas/{quote(tenant_id, safe='')}/reservations", body)
        return Reservation(self, tenant_id, answer)

    def token_units(self, record: dict[str, Any]) -> Decimal:
        """The event's Token Units by the price book (raises if it cannot be priced)."""
        if self.price_book is None:
            raise ValueError("actual_tu is required when the Meter has no price_book")
        result = self.price_book.rate(record, None, ZERO)
        if isinstance(result, Unpriced):
            raise ValueError(f"the event cannot be priced: {result.reason}")
        return result.token_units

    def close(self) -> None:
        self._drop()


class Reservation:
    """A granted (possibly zero) reservation; commit or release it once."""

    def __init__(self, meter: Meter, tenant_id: str, answer: dict[str, Any]) -> None:
        self.meter = meter
        self.tenant_id = tenant_id
        self.id: str | None = answer.get("reservation_id")
        self.granted = Decimal(str(answer.get("granted", "0")))
        self.requested = Decimal(str(answer.get("requested", "0")))
        self.over_limit = bool(answer.get("over_limit", False))
        self.expires_at: str | None = answer.get("expires_at")
        self.settled = False

    def __repr__(self) -> str:
        return f"Reservation({self.id!r}, granted={self.granted})"

    def commit(
        self, actual_tu: Decimal | int | str | None, event: UsageEvent | dict[str, Any]
    ) -> CommitResult:
        """Settle with what the call used and send its usage event (the event is sent
        even if settling fails; see ``CommitResult``). Raises ``InvalidEventError``
        (nothing committed, nothing sent) for an event the worker would reject, and
        ``ValueError`` for an event of another tenant."""
        record = event.to_record() if isinstance(event, UsageEvent) else dict(event)
        if record.get("tenant_id") != self.tenant_id:
            raise ValueError(f"the event's tenant_id is not {self.tenant_id!r}")
        rejection = check_record(record, now_ms(), self.meter.producer.rules)
        if rejection is not None:
            raise InvalidEventError(rejection)
        used = Decimal(str(actual_tu)) if actual_tu is not None else self.meter.token_units(record)
        event_id = str(record["event_id"])
        body: dict[str, Any] | None = None
        error: str | None = None
        if self.id is not None and not self.settled:
            try:
                body = self.meter.call(
                    "POST",
                    f"/v1/reservations/{quote(self.id, safe='')}/commit",
                    {"token_units": format(used, "f"), "event_id": event_id},
                )
            except QuotaServiceError as exc:
                error = str(exc)
        self.settled = True
        self.meter.producer.send_record(record)
        return CommitResult(body is not None, event_id, used, body, error)

    def release(self) -> None:
        """Give the reservation back (no-op if already settled or nothing granted)."""
        if self.id is None or self.settled:
            self.settled = True
            return
        self.settled = True
        try:
            self.meter.call("DELETE", f"/v1/reservations/{quote(self.id, safe='')}")
        except QuotaServiceError as exc:
            if exc.status not in (0, 404, 409):  # unreachable/expired: the TTL releases it
                raise

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.settled:
            self.release()
