"""The reservation journal: open reservations survive a worker restart.

The quota server (``quotad/journal.go``) keeps this file in production; this class is
the Python reference's (``QuotaService`` without a quota server, in unit tests). Both
read and write the same lines.

Every reserve, commit and release is appended to a local file (one JSON line) before
the HTTP answer goes out. The write goes to the operating system at once (no buffer in
the process), so a killed worker (SIGKILL) loses nothing; a host crash can lose the
last writes, as no fsync is done per call. At start the worker replays the file, keeps
the holds that have not expired, and rewrites the file with just those.

Lines: ``{"o":"r","id":…,"t":tenant,"s":subscriber,"a":amount,"x":expires_ms}``
(reserve), ``{"o":"c","id":…,"a":committed,"e":event_id,"x":pending_expires_ms}``
(commit), ``{"o":"d","id":…}`` (released).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path

from pipeline.metering.quota import Hold, QuotaKey, fmt
from pipeline.settings import Settings, private_dir

log = logging.getLogger(__name__)

COMPACT_AFTER = 200_000  # lines


@dataclass(slots=True)
class JournalHold:
    """A hold read back from the journal."""

    key: QuotaKey
    hold: Hold


def journal_path(settings: Settings) -> Path:
    """Where the reservations' journal is kept (by the quota server in the worker)."""
    return settings.data_path / "quota" / "reservations.jsonl"


class Journal:
    """Append-only journal file of reservation operations."""

    def __init__(self, path: Path) -> None:
        self.path = path
        private_dir(path.parent)
        self._fd: int | None = None
        self.lines = 0

    def replay(self, now_ms: int) -> list[JournalHold]:
        """The holds still live at ``now_ms``; rewrites the file with only those."""
        holds: dict[str, JournalHold] = {}
        if self.path.exists():
            with self.path.open("r", encoding="utf-8", errors="replace") as fh:
                for number, line in enumerate(fh, start=1):
                    try:
                        self._apply(holds, json.loads(line))
                    except (ValueError, KeyError, TypeError, InvalidOperation):
                        # A torn last line (killed mid-write) is expected; anything else
                        # would be a bug, but one bad line must not block the worker.
                        log.warning("reservation journal line %d ignored", number)
        live = [h for h in holds.values() if h.hold.expires_ms > now_ms]
        self._rewrite(live)
        return live

    @staticmethod
    def _apply(holds: dict[str, JournalHold], op: dict[str, object]) -> None:
        kind, res_id = op["o"], str(op["id"])
        if kind == "r":
            amount = Decimal(str(op["a"]))
            holds[res_id] = JournalHold(
                QuotaKey(str(op["t"]), str(op.get("s") or "")),
                Hold(res_id, amount, int(str(op["x"])), amount),
            )
        elif kind == "c":
            found = holds.get(res_id)
            if found is None:
                return
            amount = Decimal(str(op["a"]))
            if amount == 0:
                del holds[res_id]
                return
            found.hold.pending = True
            found.hold.amount = amount
            found.hold.event_id = str(op["e"]) if op.get("e") is not None else None
            found.hold.expires_ms = int(str(op["x"]))
        elif kind == "d":
            holds.pop(res_id, None)

    def _rewrite(self, live: list[JournalHold]) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # as the journal
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for jh in live:
                h = jh.hold
                fh.write(self._line_reserve(jh.key, h.id, h.granted, h.expires_ms))
                if h.pending:
                    fh.write(self._line_commit(h.id, h.amount, h.event_id, h.expires_ms))
        os.replace(tmp, self.path)
        self.close()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.lines = len(live)

    def compact(self, live: list[JournalHold]) -> None:
        """Rewrite the file with ``live`` holds only (when it has grown long)."""
        self._rewrite(live)

    @staticmethod
    def _line_reserve(key: QuotaKey, res_id: str, amount: Decimal, expires_ms: int) -> str:
        # ids are ASCII (base64url, hex); tenant and subscriber ids go through JSON
        return (
            f'{{"o":"r","id":"{res_id}","t":{json.dumps(key.tenant_id)},'
            f'"s":{json.dumps(key.subscriber_id)},"a":"{fmt(amount)}","x":{expires_ms}}}\n'
        )

    @staticmethod
    def _line_commit(res_id: str, amount: Decimal, event_id: str | None, expires_ms: int) -> str:
        return (
            f'{{"o":"c","id":"{res_id}","a":"{fmt(amount)}",'
            f'"e":{json.dumps(event_id)},"x":{expires_ms}}}\n'
        )

    def _write(self, line: str) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, line.encode())
        self.lines += 1

    def reserved(self, key: QuotaKey, res_id: str, amount: Decimal, expires_ms: int) -> None:
        self._write(self._line_reserve(key, res_id, amount, expires_ms))

    def committed(
        self, res_id: str, amount: Decimal, event_id: str | None, expires_ms: int
    ) -> None:
        self._write(self._line_commit(res_id, amount, event_id, expires_ms))

    def released(self, res_id: str) -> None:
        self._write(f'{{"o":"d","id":"{res_id}"}}\n')

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
