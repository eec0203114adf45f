"""Quota enforcement in the worker: reserve, then commit or release (see docs/quotas.md).

- ``service.QuotaService``: running usage, definitions, alerts, in the worker; without
  a quota server (unit tests) also the reservations, as the reference of the rules;
- ``link``: the worker's end of the quota server, the Go program in ``quotad/`` that
  owns the web port, answers the HTTP calls of contract section 4 and holds the
  reservations and their journal;
- ``definitions``: the compacted definitions topic; ``alerts``: quota-events;
  ``webhooks``: signed, retried deliveries; ``journal``: open reservations on disk.

The quota math itself is pure and lives in ``pipeline/metering/quota.py``.
"""

from __future__ import annotations

from pipeline.quota.service import NotReadyError, QuotaService

__all__ = ["NotReadyError", "QuotaService"]
