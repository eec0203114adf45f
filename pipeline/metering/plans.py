"""Tenant plans: which price-card plan (graduated tiers) a tenant is on.

File format (YAML, ``config/tenant_plans.yaml`` by default)::

    default: null          # plan for unlisted tenants; null = list price
    tenants:
      tn-cmcc-0001: enterprise
      tn-cmcc-0002: null   # list price, whatever the default

Pure logic and a loader; a bad file raises ``PlansError`` naming the file and setting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml

BEIJING = timedelta(hours=8)  # China has one time zone and no daylight saving time


class PlansError(Exception):
    """The tenant plans file is unreadable or malformed."""


@dataclass(frozen=True)
class TenantPlans:
    """tenant_id -> plan name, with a default."""

    default: str | None = None
    tenants: dict[str, str | None] = field(default_factory=dict)

    def plan_for(self, tenant_id: str) -> str | None:
        """The tenant's plan, or ``None`` for list price."""
        return self.tenants.get(tenant_id, self.default)


def load_plans(path: Path | None) -> TenantPlans:
    """Read a plans file; ``None`` means everyone pays list price. A path that does not
    exist is an error (a mistyped path must not bill everyone at list price)."""
    if path is None:
        return TenantPlans()
    if not path.exists():
        raise PlansError(f"TOKENMETER_TENANT_PLANS: {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlansError(f"{path.name}: cannot read: {exc}") from None
    try:
        data: Any = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise PlansError(f"{path.name}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise PlansError(f"{path.name}: expected a mapping with `default` and `tenants`")
    unknown = set(data) - {"default", "tenants"}
    if unknown:
        raise PlansError(f"{path.name}: {sorted(unknown)[0]}: unknown setting")
    default = data.get("default")
    tenants = data.get("tenants") or {}
    if default is not None and not (isinstance(default, str) and default.strip()):
        raise PlansError(f"{path.name}: default: must be a plan name or null")
    if not isinstance(tenants, dict):
        raise PlansError(f"{path.name}: tenants: must map tenant ids to plan names")
    for tenant, plan in tenants.items():
        if not isinstance(tenant, str):
            raise PlansError(
                f"{path.name}: tenants: {tenant!r}: a tenant id must be text (quote it)"
            )
        if plan is not None and not (isinstance(plan, str) and plan.strip()):
            raise PlansError(f"{path.name}: tenants.{tenant}: must be a plan name or null")
    return TenantPlans(default, dict(tenants))


def period_key(event_ms: int, period: str) -> str:
    """The tier period an event falls in, in Beijing time: ``2026-11`` or ``2026-11-28``."""
    local = datetime.fromtimestamp(event_ms / 1000, tz=UTC) + BEIJING
    return local.strftime("%Y-%m") if period == "month" else local.strftime("%Y-%m-%d")


def minute_start_s(event_ms: int) -> int:
    """Epoch seconds of the start of the event's minute."""
    return (event_ms // 60_000) * 60


def hour_start_s(event_ms: int) -> int:
    """Epoch seconds of the start of the event's hour (same in UTC and Beijing time)."""
    return (event_ms // 3_600_000) * 3600


def day_start_s(event_ms: int) -> int:
    """Epoch seconds of the start of the event's calendar day in Beijing time."""
    offset = int(BEIJING.total_seconds())
    return ((event_ms // 1000 + offset) // 86_400) * 86_400 - offset
