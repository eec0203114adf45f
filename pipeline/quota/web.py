"""The quota service's HTTP calls (contract section 4), as faust views.

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
such reservation), 409 (reservation already committed/released/expired) or 503 (not
ready for this tenant yet: retry; carries ``Retry-After: 1``).

Routing: a tenant's quota lives on the worker that owns the tenant's partition of the
usage topic (its events are keyed by tenant). A request reaching another worker is
forwarded there (body included), found in faust's assignment of that topic (the
partition is computed with Kafka's murmur2 partitioner, as producers do); reservation ids
name their tenant, so commit and release route the same way.
"""

from __future__ import annotations

import json
from typing import Any

import faust
from faust.web import Request, Response, View
from yarl import URL

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
    grant_json,
    parse_reservation_id,
    settlement_json,
    status_json,
)

FORWARDED = "X-Tokenmeter-Forwarded"
OWNER = "X-Tokenmeter-Owner"  # on answers forwarded from the owning worker
DEFAULT_TTL_S = 30.0


class BadRequestError(QuotaError):
    """The request body is not what the call expects."""


def _status_of(exc: QuotaError) -> int:
    if isinstance(exc, BadAmountError | BadRequestError):
        return 400
    if isinstance(exc, NoQuotaError | ReservationNotFoundError):
        return 404
    if isinstance(exc, NotReadyError):
        return 503
    return 409  # settled, or any other refusal of the ledger


async def _body(request: Request, example: str) -> dict[str, Any]:
    try:
        body = await request.json()
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


def register_quota_pages(app: faust.App, service: QuotaService) -> None:
    """Add the four quota calls to the worker's faust app."""
    usage_topic = service.settings.topic_usage

    def reply(view: View, body: Any, status: int = 200) -> Response:
        return view.bytes(
            json.dumps(body, separators=(",", ":")).encode(),
            content_type="application/json",
            status=status,
        )

    def refuse(view: View, exc: QuotaError) -> Response:
        status = _status_of(exc)
        headers = {"Retry-After": "1"} if status == 503 else None
        body: dict[str, Any] = {"error": str(exc)}
        if isinstance(exc, ReservationSettledError):
            body["reservation"] = settlement_json(exc.settlement)
        return view.bytes(
            json.dumps(body).encode(),
            content_type="application/json",
            status=status,
            headers=headers,
        )

    async def route_reservation(
        view: View, request: Request, reservation_id: str
    ) -> Response | None:
        """A refusal for a malformed id, the owner's answer when another worker owns the
        reservation's tenant, or ``None``: handle it here."""
        try:
            key = parse_reservation_id(reservation_id)
        except QuotaError as exc:
            return refuse(view, exc)
        return await forward(view, request, key.tenant_id)

    async def forward(view: View, request: Request, tenant_id: str) -> Response | None:
        """Send the request to the worker owning ``tenant_id`` if that is not us."""
        if service.owns(tenant_id) or request.headers.get(FORWARDED):
            return None
        partition = service.partition_of(tenant_id)
        dest: URL | None = None
        # {worker url: {topic: partitions}}, as faust's assignor distributed it
        for owner, topics in app.router.external_topics_metadata().items():
            if partition in topics.get(usage_topic, ()):
                dest = URL(owner)
                break
        here = app.conf.canonical_url
        if dest is None or (dest.host, dest.port) == (here.host, here.port):
            return None  # no owner known yet, or us: answer here (503 until restored)
        target = request.url.with_host(dest.host or "").with_port(dest.port)
        data = await request.read()
        headers = {FORWARDED: "1", "Content-Type": "application/json"}
        async with app.http_client.request(
            method=request.method, url=target, data=data, headers=headers
        ) as resp:
            return view.bytes(
                await resp.read(),
                content_type="application/json",
                status=resp.status,
                headers={OWNER: str(dest)},
            )

    @app.page("/v1/quotas/{tenant_id}", name="quota_status")
    class QuotaStatusView(View):
        async def get(self, request: Request, tenant_id: str) -> Response:
            routed = await forward(self, request, tenant_id)
            if routed is not None:
                return routed
            try:
                status = service.get(tenant_id, request.query.get("subscriber_id") or None)
            except QuotaError as exc:
                return refuse(self, exc)
            return reply(self, status_json(status))

    @app.page("/v1/quotas/{tenant_id}/reservations", name="quota_reservations")
    class ReservationsView(View):
        async def post(self, request: Request, tenant_id: str) -> Response:
            routed = await forward(self, request, tenant_id)
            if routed is not None:
                return routed
            try:
                body = await _body(request, '{"token_units": n, "ttl_s": t}')
                if "token_units" not in body:
                    raise BadRequestError('token_units: required ({"token_units": n, "ttl_s": t})')
                amount = to_tu(body["token_units"])
                ttl = body.get("ttl_s", DEFAULT_TTL_S)
                if isinstance(ttl, bool) or not isinstance(ttl, int | float):
                    raise BadRequestError("ttl_s: must be a number of seconds")
                subscriber = _optional_str(body, "subscriber_id")
                grant = service.reserve(tenant_id, amount, float(ttl), subscriber)
            except QuotaError as exc:
                return refuse(self, exc)
            return reply(self, grant_json(grant), 201 if grant.reservation_id else 200)

    @app.page("/v1/reservations/{reservation_id}/commit", name="quota_commit")
    class CommitView(View):
        async def post(self, request: Request, reservation_id: str) -> Response:
            routed = await route_reservation(self, request, reservation_id)
            if routed is not None:
                return routed
            try:
                body = await _body(request, '{"token_units": used}')
                if "token_units" not in body:
                    raise BadRequestError('token_units: required ({"token_units": used})')
                amount = to_tu(body["token_units"])
                event_id = _optional_str(body, "event_id")
                outcome = service.commit(reservation_id, amount, event_id)
            except QuotaError as exc:
                return refuse(self, exc)
            return reply(self, settlement_json(outcome))

    @app.page("/v1/reservations/{reservation_id}", name="quota_release")
    class ReleaseView(View):
        async def delete(self, request: Request, reservation_id: str) -> Response:
            routed = await route_reservation(self, request, reservation_id)
            if routed is not None:
                return routed
            try:
                outcome = service.release(reservation_id)
            except QuotaError as exc:
                return refuse(self, exc)
            return reply(self, settlement_json(outcome))
