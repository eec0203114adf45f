"""Quota enforcement in the worker: reserve, then commit or release (see docs/quotas.md).

- ``service.QuotaService``: ledgers, running usage, alerts; in the worker (usage,
  alerts) and, as its follower, in the quota server (reservations, journal);
- ``server``: the quota server process that owns the web port; ``link``: the worker's
  end of it; ``web.QuotaApi``: the HTTP calls of contract section 4;
- ``definitions``: the compacted definitions topic; ``alerts``: quota-events;
  ``webhooks``: signed, retried deliveries; ``journal``: open reservations on disk.

The quota math itself is pure and lives in ``pipeline/metering/quota.py``.
"""

from __future__ import annotations

from pipeline.quota.service import NotReadyError, QuotaService

__all__ = ["NotReadyError", "QuotaService"]
