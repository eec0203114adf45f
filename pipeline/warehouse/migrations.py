"""Numbered ClickHouse migrations (``schemas/clickhouse/NNN_name.sql``), applied in order,
recorded in ``schema_migrations`` and safe to re-run: an applied version is skipped, and
an applied file whose text changed is reported instead of silently re-applied."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.warehouse.base import Warehouse, WarehouseError, rows

MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "schemas" / "clickhouse"
_NAME = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")

_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations
(
    version    UInt32,
    name       String,
    checksum   String,
    applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
)
ENGINE = MergeTree ORDER BY version
"""


@dataclass(frozen=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text()

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()[:16]

    def statements(self) -> list[str]:
        """The file split into statements at semicolons that end a line."""
        body = "\n".join(
            line for line in self.sql.splitlines() if not line.lstrip().startswith("--")
        )
        return [s.strip() for s in re.split(r";\s*(?:\n|$)", body) if s.strip()]


def discover(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """All migration files, ordered by version; a malformed name is an error."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise WarehouseError(f"{path.name}: migration files are named NNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(versions) != len(set(versions)):
        raise WarehouseError("two migration files share a version number")
    return found


def apply_migrations(wh: Warehouse, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply every migration not yet recorded. Returns the ones applied now."""
    wh.execute(_LEDGER)
    applied = {
        int(r["version"]): str(r["checksum"])
        for r in rows(wh.query_arrow("SELECT version, checksum FROM schema_migrations"))
    }
    done = []
    for migration in discover(directory):
        if migration.version in applied:
            if applied[migration.version] != migration.checksum:
                raise WarehouseError(
                    f"{migration.path.name} changed after it was applied; add a new "
                    "migration instead of editing an applied one"
                )
            continue
        for statement in migration.statements():
            wh.execute(statement)
        wh.insert_arrow(
            "schema_migrations",
            pa.table(
                {
                    "version": pa.array([migration.version], pa.uint32()),
                    "name": [migration.name],
                    "checksum": [migration.checksum],
                }
            ),
        )
        done.append(migration)
    return done
