"""The quota service's HTTP calls (contract section 4), independent of any HTTP server.

- ``GET    /v1/quotas/{tenant_id}[?subscriber_id=S]``: limit, used, reserved, remaining,
  state (``ok``/``warning``/``exhausted``) of the current period;
- ``POST   /v1/quotas/{tenant_id}/reservations`` ``{"token_units": n, "ttl_s": t}``
  (optional ``"subscriber_id"``): 201 with a reservation, or 200 with
  ``"reservation_id": null`` when nothing could be granted;
- ``POST   /v1/reservations/{id}/commit`` ``{"token_units": used}`` (optional
  ``"event_id"``, the usage event's id: it lets the worker match the event);
- ``DELETE /v1/reservations/{id}``.

Amounts are exact decimal strings in answers and may be numbers or strings in requests.
Errors are ``{"error": "..."}`` with 400 (bad body), 404 (no quota for the tenant, no
such reservation), 405 (another method on a quota path), 409 (reservation already
committed/released/expired) or 503 (not ready for this tenant yet: retry; carries
``Retry-After: 1``).

``QuotaApi.match`` says whether a request is a quota call (and for which tenant, so the
server can route it to the worker owning the tenant's partition); ``QuotaApi.handle``
answers it from the local ``QuotaService``. The server (``server.py``) does the I/O.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from pipeline.metering.quota import (
    BadAmountError,
    NoQuotaError,
    QuotaError,
    ReservationNotFoundError,
    ReservationSettledError,
    to_tu,
)
from pipeline.quota.service import (
    NotReadyError,
    QuotaService,
    grant_body,
    parse_reservation_id,
    settlement_body,
    settlement_json,
    status_json,
)

FORWARDED = "X-Tokenmeter-Forwarded"
OWNER = "X-Tokenmeter-Owner"  # on answers forwarded from the owning worker
DEFAULT_TTL_S = 30.0
JSON = "application/json"

# what a call is, for the metrics: status, reserve, commit, release
Observer = Callable[[str, str | None, float], None]  # (call, reserve outcome, seconds)


class BadRequestError(QuotaError):
    """The request body is not what the call expects."""


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer: status, JSON body and extra headers."""

    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = JSON


@dataclass(frozen=True, slots=True)
class Call:
    """A request recognised as a quota call."""

    name: str  # status | reserve | commit | release
    tenant_id: str | None  # None: the reservation id is malformed (answered 404)
    reservation_id: str | None = None


def _status_of(exc: QuotaError) -> int:
    if isinstance(exc, BadAmountError | BadRequestError):
        return 400
    if isinstance(exc, NoQuotaError | ReservationNotFoundError):
        return 404
    if isinstance(exc, NotReadyError):
        return 503
    return 409  # settled, or any other refusal of the ledger


def reply(body: Any, status: int = 200) -> Reply:
    return Reply(status, json.dumps(body, separators=(",", ":")).encode())


def refuse(exc: QuotaError) -> Reply:
    status = _status_of(exc)
    body: dict[str, Any] = {"error": str(exc)}
    if isinstance(exc, ReservationSettledError):
        body["reservation"] = settlement_json(exc.settlement)
    headers = (("Retry-After", "1"),) if status == 503 else ()
    return Reply(status, json.dumps(body).encode(), headers)


def error(status: int, message: str) -> Reply:
    return Reply(status, json.dumps({"error": message}).encode())


def _body(raw: bytes, example: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise BadRequestError(f"body must be JSON: {example}") from None
    if not isinstance(body, dict):
        raise BadRequestError(f"body must be a JSON object: {example}")
    return body


def _optional_str(body: dict[str, Any], name: str) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not value or len(value) > 256:
        raise BadRequestError(f"{name}: must be a non-empty string")
    return value


_ALLOWED = {"status": "GET", "reserve": "POST", "commit": "POST", "release": "DELETE"}


class QuotaApi:
    """The four calls over one ``QuotaService``; ``observe`` is told each local call's
    name, the outcome of a reservation (granted, partial, denied, error) and its time."""

    def __init__(self, service: QuotaService, observe: Observer | None = None) -> None:
        self.service = service
        self.observe = observe

    @staticmethod
    def match(method: str, path: str) -> Call | None | Reply:
        """The quota call a request is, ``None`` if it is no quota path, or a ready
        ``Reply`` (405) for a wrong method on a quota path."""
        parts = path.split("/")
        # "", "v1", "quotas"|"reservations", x[, "reservations"|"commit"]
        if len(parts) < 4 or parts[1] != "v1" or not parts[3]:
            return None
        name: str | None = None
        if parts[2] == "quotas":
            if len(parts) == 4:
                name = "status"
            elif len(parts) == 5 and parts[4] == "reservations":
                name = "reserve"
        elif parts[2] == "reservations":
            if len(parts) == 4:
                name = "release"
            elif len(parts) == 5 and parts[4] == "commit":
                name = "commit"
        if name is None:
            return None
        if method != _ALLOWED[name]:
            return Reply(
                405,
                json.dumps({"error": f"method not allowed: use {_ALLOWED[name]}"}).encode(),
                (("Allow", _ALLOWED[name]),),
            )
        segment = unquote(parts[3])
        if name in ("status", "reserve"):
            return Call(name, segment)
        try:
            tenant: str | None = parse_reservation_id(segment).tenant_id
        except QuotaError:
            tenant = None
        return Call(name, tenant, segment)

    def handle(self, call: Call, query: str, raw: bytes) -> Reply:
        """Answer ``call`` here (``query``: the URL's query string, ``raw``: the body)."""
        started = time.perf_counter()
        outcome: str | None = None
        try:
            if call.name == "status":
                assert call.tenant_id is not None
                sub = parse_qs(query).get("subscriber_id", [""])[0] if query else ""
                answer = reply(status_json(self.service.get(call.tenant_id, sub or None)))
            elif call.name == "reserve":
                outcome = "error"
                answer, outcome = self._reserve(call, raw)
            elif call.name == "commit":
                answer = self._commit(call, raw)
            else:
                if call.tenant_id is None or call.reservation_id is None:
                    raise ReservationNotFoundError(f"not a reservation id: {call.reservation_id!r}")
                answer = Reply(200, settlement_body(self.service.release(call.reservation_id)))
        except QuotaError as exc:
            answer = refuse(exc)
        if self.observe is not None:
            self.observe(call.name, outcome, time.perf_counter() - started)
        return answer

    def _reserve(self, call: Call, raw: bytes) -> tuple[Reply, str]:
        assert call.tenant_id is not None
        body = _body(raw, '{"token_units": n, "ttl_s": t}')
        if "token_units" not in body:
            raise BadRequestError('token_units: required ({"token_units": n, "ttl_s": t})')
        amount = to_tu(body["token_units"])
        ttl = body.get("ttl_s", DEFAULT_TTL_S)
        if isinstance(ttl, bool) or not isinstance(ttl, int | float):
            raise BadRequestError("ttl_s: must be a number of seconds")
        subscriber = _optional_str(body, "subscriber_id")
        grant = self.service.reserve(call.tenant_id, amount, float(ttl), subscriber)
        if grant.granted <= 0:
            outcome = "denied"
        elif grant.granted < grant.requested:
            outcome = "partial"
        else:
            outcome = "granted"
        return Reply(201 if grant.reservation_id else 200, grant_body(grant)), outcome

    def _commit(self, call: Call, raw: bytes) -> Reply:
        if call.tenant_id is None or call.reservation_id is None:
            raise ReservationNotFoundError(f"not a reservation id: {call.reservation_id!r}")
        body = _body(raw, '{"token_units": used}')
        if "token_units" not in body:
            raise BadRequestError('token_units: required ({"token_units": used})')
        amount = to_tu(body["token_units"])
        event_id = _optional_str(body, "event_id")
        return Reply(
            200, settlement_body(self.service.commit(call.reservation_id, amount, event_id))
        )
