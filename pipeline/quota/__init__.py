"""Quota enforcement in the worker: reserve, then commit or release (see docs/quotas.md).

- ``service.QuotaService``: ledgers, running usage, alerts; runs in the worker's loop;
- ``web.register_quota_pages``: the HTTP calls of contract section 4;
- ``definitions``: the compacted definitions topic; ``alerts``: quota-events;
  ``webhooks``: signed, retried deliveries; ``journal``: open reservations on disk.

The quota math itself is pure and lives in ``pipeline/metering/quota.py``.
"""

from __future__ import annotations

from pipeline.quota.service import NotReadyError, QuotaService
from pipeline.quota.web import register_quota_pages

__all__ = ["NotReadyError", "QuotaService", "register_quota_pages"]
