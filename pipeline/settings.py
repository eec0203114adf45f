"""One settings object for every command: ``TOKENMETER_*`` environment variables and flags.

Nothing else in the code base reads the environment. Secrets are ``SecretStr`` and never
appear in logs or ``repr``. A bad value is reported by its variable name (see
``load_settings``), never as a traceback.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "TOKENMETER_"
REPO_ROOT = Path(__file__).resolve().parent.parent


class SettingsError(Exception):
    """A configuration value is wrong; the message names the setting."""


# Everything tokenmeter keeps under the data dir is its user's only: raw usage events
# (the broker's log segments, the producer spool), the warehouse, keys, the quota journal.
# Processes that write there run with this umask (files 0600, directories 0700).
PRIVATE_UMASK = 0o077
# what the project creates under the data dir (tightened when the worker or `stack up`
# starts; anything else there is left alone, the data dir itself being 0700)
_DATA_DIR_ENTRIES = (
    "warehouse",
    "kafka",
    "spool",
    "secrets",
    "quota",
    "worker",
    "faults",
    "reports",
    "worker.json",
    "worker.log",
    "quota_webhooks.yaml",
)


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """Run the block (and the processes it starts) with ``PRIVATE_UMASK``; the umask is
    process-wide, so only for a command's own main thread."""
    previous = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(previous)


def private_dir(path: Path) -> Path:
    """Create directory ``path`` and its missing parents with mode 0700 (whatever the
    umask); an existing one is left as it is. Returns ``path``."""
    missing = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o700)
        except FileExistsError:  # another process made it first
            continue
        directory.chmod(0o700)
    return path


def tighten(path: Path) -> int:
    """Take the group and other permission bits off ``path`` and, for a directory,
    everything under it (symbolic links are not followed). Entries that vanish meanwhile
    (a running engine's temporary files) or belong to another user are skipped.
    Returns how many entries were changed."""
    names = [str(path)]
    if path.is_dir() and not path.is_symlink():
        for root, dirs, files in os.walk(path):
            names += [os.path.join(root, n) for n in dirs + files]
    changed = 0
    for name in names:
        try:
            mode = os.lstat(name).st_mode
            if stat.S_ISLNK(mode) or not mode & 0o077:
                continue
            os.chmod(name, stat.S_IMODE(mode) & 0o700)
            changed += 1
        except (FileNotFoundError, PermissionError):
            continue
    return changed


@dataclass(frozen=True)
class QueryLimits:
    """What one analyst query may use (``TOKENMETER_QUERY_MAX_*``; the defaults are the
    settings' defaults). ``engine_settings`` gives them as ClickHouse settings."""

    seconds: float = 60.0
    memory: int = 2 * 1024**3
    result_rows: int = 1_000_000
    result_bytes: int = 256 * 1024**2
    rows_to_read: int = 10_000_000_000
    bytes_to_read: int = 1024**4

    def engine_settings(self) -> dict[str, int | float | str]:
        """ClickHouse settings, in the order to apply them; ``readonly`` comes last, so
        that once it is on, nothing (the analyst's own SETTINGS clause included) can
        change the limits before it. Overflow modes are "throw": a query over a limit
        fails with the engine's error instead of returning a silently cut result."""
        return {
            "max_execution_time": self.seconds,
            "timeout_overflow_mode": "throw",
            "max_memory_usage": self.memory,
            "max_result_rows": self.result_rows,
            "max_result_bytes": self.result_bytes,
            "result_overflow_mode": "throw",
            "max_rows_to_read": self.rows_to_read,
            "max_bytes_to_read": self.bytes_to_read,
            "read_overflow_mode": "throw",
            # addressToSymbol, demangle, ...: they read the server's memory layout
            "allow_introspection_functions": 0,
            "readonly": 1,
        }


class Settings(BaseSettings):
    """All of tokenmeter's settings. Every field maps to ``TOKENMETER_<FIELD>``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    data_dir: Path = Field(default=Path(".tokenmeter"))
    kafka_bootstrap: str = "127.0.0.1:9092"
    kafka_port: int = Field(default=9092, ge=1024, le=65535)
    kafka_controller_port: int = Field(default=9093, ge=1024, le=65535)
    kafka_partitions: int = Field(default=4, ge=1, le=256)
    kafka_heap_mb: int = Field(default=768, ge=128)
    # empty = embedded chdb under data_dir/warehouse; a clickhouse:// URL may hold a password
    warehouse_url: SecretStr = SecretStr("")
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=1, le=65535)

    # topics (contract names; overridable so tests can isolate themselves)
    topic_usage: str = "usage-events"
    topic_dead_letters: str = "usage-dead-letters"
    topic_quota_events: str = "quota-events"
    consumer_group: str = "tokenmeter-worker"

    # validation rules (contract section 1)
    lateness_limit_s: int = Field(default=35 * 24 * 3600, ge=60)
    future_skew_s: int = Field(default=300, ge=0)
    max_tokens: int = Field(default=10_000_000, ge=1)

    # rating and windows
    price_cards: Path = Field(default=REPO_ROOT / "config" / "price_cards")
    tenant_plans: Path | None = Field(default=REPO_ROOT / "config" / "tenant_plans.yaml")
    window_grace_s: int = Field(default=300, ge=0, le=86_400)

    # wire format: Avro single-object encoding (built-in schema ids) or Confluent framing
    # with a Schema Registry; the worker reads both when a registry is configured
    wire_format: Literal["single_object", "confluent"] = "single_object"
    schema_registry_url: str = ""

    # producer spool (broker outages)
    spool_after_s: float = Field(default=10.0, gt=0)
    spool_max_mb: int = Field(default=1024, ge=1)

    # fault drills: while this file exists, warehouse inserts fail (see warehouse/faults.py)
    fault_file: Path | None = None

    # worker batching
    batch_max: int = Field(default=50_000, ge=1, le=500_000)
    batch_within_s: float = Field(default=0.2, gt=0)
    sink_retry_max_s: float = Field(default=30.0, gt=0)
    # the nice value (0-19) of the worker's pipeline thread (batch decoding, rating,
    # inserts); the quota server keeps the normal priority (see docs/quotas.md)
    pipeline_nice: int = Field(default=10, ge=0, le=19)
    # the quota server's nice value; below 0 (above other processes) needs privileges
    quota_server_nice: int = Field(default=0, ge=-20, le=19)
    # 1-99: run the quota server under the real-time policy SCHED_FIFO at this priority
    # (ahead of every normal process; needs privileges); 0: the normal policy
    quota_server_rtprio: int = Field(default=0, ge=0, le=99)
    # what a client of the web port may take (docs/quotas.md, "Limits"): a request head
    # within header_timeout_s and its body within body_timeout_s (else 408), a kept-alive
    # connection idle up to idle_timeout_s; past max_connections open, new ones get 503
    quota_server_header_timeout_s: float = Field(default=10.0, gt=0, le=3600)
    quota_server_body_timeout_s: float = Field(default=30.0, gt=0, le=3600)
    quota_server_idle_timeout_s: float = Field(default=60.0, gt=0, le=86_400)
    quota_server_max_connections: int = Field(default=1024, ge=1, le=1_000_000)

    # security
    pseudonym_key: SecretStr | None = None
    # quota webhooks to loopback, private and link-local addresses (a host that is one,
    # or a name that resolves to one) are refused unless this is true (docs/quotas.md)
    webhook_allow_private: bool = False

    # an analyst's read-only query (`tokenmeter sql`, POST /v1/query): limits the server
    # sets on the engine before it turns readonly on, so the query cannot lift them
    query_max_seconds: float = Field(default=60.0, gt=0, le=86_400)
    query_max_memory: int = Field(default=2 * 1024**3, ge=16 * 1024**2)  # bytes
    query_max_result_rows: int = Field(default=1_000_000, ge=1)
    query_max_result_bytes: int = Field(default=256 * 1024**2, ge=1024)
    query_max_rows_to_read: int = Field(default=10_000_000_000, ge=1)
    query_max_bytes_to_read: int = Field(default=1024**4, ge=1024)  # 1 TiB

    @model_validator(mode="after")
    def _registry_for_confluent(self) -> Settings:
        if self.wire_format == "confluent" and not self.schema_registry_url:
            raise ValueError("wire_format confluent needs TOKENMETER_SCHEMA_REGISTRY_URL")
        return self

    @field_validator("web_host")
    @classmethod
    def _host_not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    # ---- derived paths -------------------------------------------------
    @property
    def data_path(self) -> Path:
        return self.data_dir.expanduser().resolve()

    @property
    def warehouse_path(self) -> Path:
        return self.data_path / "warehouse"

    @property
    def kafka_path(self) -> Path:
        return self.data_path / "kafka"

    @property
    def spool_path(self) -> Path:
        return self.data_path / "spool"

    def private_data_dir(self) -> str:
        """Create the data dir with mode 0700, and take the group and other bits off it
        and off what the project keeps in it (``warehouse/``, ``kafka/``, ...), as an
        older version or another umask may have left them. Returns a line to log when
        something was tightened, else ""."""
        root = private_dir(self.data_path)
        changed = 0
        if root.stat().st_mode & 0o077:
            root.chmod(stat.S_IMODE(root.stat().st_mode) & 0o700)
            changed += 1
        for name in _DATA_DIR_ENTRIES:
            changed += tighten(root / name)
        if not changed:
            return ""
        return (
            f"group or others could read {changed} of the files and directories in {root}: "
            "made owner-only (directories 0700, files 0600)"
        )

    @property
    def web_url(self) -> str:
        return f"http://{self.web_host}:{self.web_port}"

    def query_limits(self) -> QueryLimits:
        """The ``TOKENMETER_QUERY_MAX_*`` settings as the warehouse applies them."""
        return QueryLimits(
            seconds=self.query_max_seconds,
            memory=self.query_max_memory,
            result_rows=self.query_max_result_rows,
            result_bytes=self.query_max_result_bytes,
            rows_to_read=self.query_max_rows_to_read,
            bytes_to_read=self.query_max_bytes_to_read,
        )

    def registry_client(self) -> Any:
        """A Schema Registry client for ``schema_registry_url`` (``mock://`` in tests)."""
        from confluent_kafka.schema_registry import SchemaRegistryClient

        return SchemaRegistryClient.new_client({"url": self.schema_registry_url})

    def pseudonym_secret(self) -> bytes:
        """The HMAC key for subscriber ids.

        From ``TOKENMETER_PSEUDONYM_KEY`` if set; otherwise a random key generated once
        per data directory (``secrets/pseudonym.key``, mode 0600), so the embedded
        default needs no configuration and still never uses a guessable key.
        """
        if self.pseudonym_key is not None:
            value = self.pseudonym_key.get_secret_value().encode()
            if len(value) < 16:
                raise SettingsError("TOKENMETER_PSEUDONYM_KEY: must be at least 16 characters")
            return value
        path = self.data_path / "secrets" / "pseudonym.key"
        if not path.exists():
            private_dir(path.parent)
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
            try:
                os.link(tmp, path)  # atomic: first writer wins if two processes race
            except FileExistsError:
                pass
            tmp.unlink(missing_ok=True)
        return path.read_text().strip().encode()


def load_settings(**overrides: Any) -> Settings:
    """Build the settings from the environment plus explicit overrides (CLI flags).

    Raises ``SettingsError`` naming the offending ``TOKENMETER_*`` variable.
    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**clean)
    except ValidationError as exc:
        parts = []
        for err in exc.errors():
            if err["loc"]:
                name = ENV_PREFIX + "_".join(str(p) for p in err["loc"]).upper()
                parts.append(f"{name}: {err['msg']}")
            else:  # a rule across settings names them in its own message
                parts.append(str(err["msg"]).removeprefix("Value error, "))
        raise SettingsError("; ".join(parts)) from None
