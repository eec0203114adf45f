"""A stand-in for a ClickHouse server's HTTP interface, for contract tests of
``ServerWarehouse``.

Why it exists: no ClickHouse server can be installed on the project's machines (Debian's
is from 2018 and clickhouse-connect cannot talk to it; see ENVIRONMENT.md). The server
backend is still exercised for real: the tests run the real clickhouse-connect client,
over real HTTP on 127.0.0.1, against this stub.

What it does, the way ClickHouse's HTTP interface does it:

- checks HTTP basic authentication (clickhouse-connect sends the user and password that
  way) and answers a wrong password with exception 516 AUTHENTICATION_FAILED, HTTP 403;
- answers the three requests clickhouse-connect makes when a client is created:
  ``SELECT version(), timezone()`` (TabSeparated), ``SELECT name, value, readonly FROM
  system.settings`` (Native format, encoded here by hand) and the protocol-version probe
  ``SELECT 1 AS check`` (answered without block info, like a server behind a proxy that
  drops ``client_protocol_version``: the client then uses protocol version 0);
- ``FORMAT TabSeparated...`` queries: the registered table's rows, tab-separated, raw;
- ``FORMAT Arrow`` / ``FORMAT ArrowStream`` queries: the Arrow IPC file / stream bytes,
  produced by pyarrow, of the table a test registered for that query; String columns go
  out as Arrow binary unless the request carries ``output_format_arrow_string_as_string=1``,
  as ClickHouse does;
- ``INSERT INTO t (cols) FORMAT Arrow|ArrowStream`` followed by the data: decodes the
  Arrow bytes and keeps them, with the request's settings, in ``inserts``;
- any other statement is a command: HTTP 200, empty body;
- errors a test asked for (``fail_on``): ClickHouse's status code for the exception,
  the ``X-ClickHouse-Exception-Code`` header and a ``Code: N. DB::Exception: ...`` body.

Every request is recorded (``requests``) with its URL parameters, so tests assert on
what the client really sent (settings such as ``readonly=1`` and
``insert_deduplication_token`` travel as URL parameters).

What it does NOT verify: SQL is not parsed or executed (queries are matched by text to
canned answers), no setting changes behaviour (``readonly=1`` is recorded, not
enforced: enforcement is the engine's, tested on chdb in ``test_warehouse.py``), no
column types are checked on insert, there is no compression, TLS, session or
multi-statement handling. It proves that ``ServerWarehouse`` drives clickhouse-connect
correctly and maps its results and errors, not that a real server would accept the SQL.
"""

from __future__ import annotations

import base64
import io
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import pyarrow as pa

VERSION = "26.9.2.1"  # the engine version chdb 4.4 embeds

# A few rows of system.settings as ClickHouse 26.9 reports them (from chdb's engine):
# the settings clickhouse-connect inspects when it connects, and the two we send.
SETTINGS: tuple[tuple[str, str, int], ...] = (
    ("readonly", "0", 0),
    ("insert_deduplicate", "1", 0),
    ("insert_deduplication_token", "", 0),
    ("output_format_arrow_string_as_string", "1", 0),
    ("date_time_input_format", "best_effort", 0),
    ("cast_string_to_dynamic_use_inference", "0", 0),
    ("max_execution_time", "0", 0),
)

# exceptionCodeToHTTPStatus.cpp in ClickHouse, for the codes the tests use
_HTTP_STATUS = {516: 403, 60: 404, 62: 400, 164: 500, 497: 403}


@dataclass
class Request:
    """One HTTP request as the stub received it."""

    method: str
    params: dict[str, str]
    headers: dict[str, str]
    query: str  # the SQL text (URL parameter and/or body; insert data excluded)
    body: bytes


@dataclass
class Insert:
    """One INSERT the stub received."""

    table: str
    columns: list[str]
    fmt: str
    data: pa.Table
    params: dict[str, str]


@dataclass
class _Failure:
    pattern: str
    code: int
    name: str
    message: str


@dataclass
class ClickHouseHTTPStub:
    """Start with ``with ClickHouseHTTPStub(password=...) as stub:``; ``stub.port``."""

    user: str = "default"
    password: str = ""
    timezone: str = "UTC"
    requests: list[Request] = field(default_factory=list)
    inserts: list[Insert] = field(default_factory=list)
    _answers: list[tuple[str, pa.Table, float]] = field(default_factory=list)
    _failures: list[_Failure] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # ---- test-facing ---------------------------------------------------------
    def answer(self, pattern: str, table: pa.Table, delay_s: float = 0.0) -> None:
        """Answer queries whose text contains ``pattern`` with ``table`` (after
        ``delay_s``, to hold a query in flight)."""
        self._answers.append((pattern, table, delay_s))

    def fail_on(self, pattern: str, code: int, name: str, message: str) -> None:
        """Answer statements containing ``pattern`` with a ClickHouse exception."""
        self._failures.append(_Failure(pattern, code, name, message))

    @property
    def port(self) -> int:
        assert self._server is not None, "stub not started"
        return int(self._server.server_address[1])

    def url(self, user: str | None = None, password: str | None = None, db: str = "tm") -> str:
        """A ``clickhouse://`` URL for this stub (credentials default to the stub's)."""
        from urllib.parse import quote

        u = quote(self.user if user is None else user, safe="")
        p = quote(self.password if password is None else password, safe="")
        return f"clickhouse://{u}:{p}@127.0.0.1:{self.port}/{db}"

    def queries(self) -> list[str]:
        """The SQL text of every request, in order."""
        return [r.query for r in self.requests]

    def last(self, containing: str) -> Request:
        """The last request whose SQL contains ``containing``."""
        for req in reversed(self.requests):
            if containing in req.query:
                return req
        raise AssertionError(f"no request containing {containing!r}: {self.queries()}")

    # ---- lifecycle -------------------------------------------------------------
    def __enter__(self) -> ClickHouseHTTPStub:
        stub = self

        class Handler(_Handler):
            owner = stub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None and self._thread is not None
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


# ---- Native format (only what system.settings and the probe need) -------------------


def _varuint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _native_string(s: str) -> bytes:
    raw = s.encode()
    return _varuint(len(raw)) + raw


def native_block(columns: list[tuple[str, str, list[Any]]]) -> bytes:
    """One Native-format block (no block info) of String and UInt8 columns."""
    rows = len(columns[0][2]) if columns else 0
    out = bytearray(_varuint(len(columns)) + _varuint(rows))
    for name, type_name, values in columns:
        out += _native_string(name) + _native_string(type_name)
        if type_name == "String":
            for v in values:
                out += _native_string(str(v))
        elif type_name == "UInt8":
            out += bytes(int(v) for v in values)
        else:
            raise ValueError(f"stub cannot encode {type_name}")
    return bytes(out)


# ---- HTTP handler -----------------------------------------------------------------

_INSERT = re.compile(
    rb"^\s*INSERT\s+INTO\s+(?P<table>\S+)\s*(?:\((?P<cols>[^)]*)\))?\s*FORMAT\s+(?P<fmt>\w+)\s*?\n",
    re.IGNORECASE,
)
_FORMAT = re.compile(r"\bFORMAT\s+(\w+)\s*$", re.IGNORECASE)


def _unquote_ident(name: str) -> str:
    name = name.strip()
    if len(name) >= 2 and name[0] == name[-1] and name[0] in '`"':
        return name[1:-1]
    return name


class _Handler(BaseHTTPRequestHandler):
    owner: ClickHouseHTTPStub
    protocol_version = "HTTP/1.1"  # keep-alive, as urllib3's pool expects

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep pytest output clean

    def do_GET(self) -> None:  # noqa: N802
        self._handle(b"")

    def do_POST(self) -> None:  # noqa: N802
        self._handle(self._read_body())

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    # ---- dispatch -------------------------------------------------------------
    def _handle(self, body: bytes) -> None:
        stub = self.owner
        parts = urlsplit(self.path)
        params = dict(parse_qsl(parts.query, keep_blank_values=True))
        if parts.path == "/ping":
            self._send(200, b"Ok.\n", {})
            return
        # An INSERT's statement comes first in the body, or (for non-bytes blocks, as
        # clickhouse-connect sends Arrow) in the ``query`` parameter with the data as body.
        insert = _INSERT.match(body) or _INSERT.match(params.get("query", "").encode() + b"\n")
        if insert and insert.string is body:
            data = body[insert.end() :]
            sql = body[: insert.end()].decode().strip()
        elif insert:
            data = body
            sql = params["query"].strip()
        else:
            data = b""
            sql = "\n".join(x for x in (params.get("query", ""), body.decode()) if x).strip()
        headers = {k: v for k, v in self.headers.items()}
        stub.requests.append(Request(self.command, params, headers, sql, body))

        if not self._authorised():
            self._exception(
                516,
                "AUTHENTICATION_FAILED",
                f"{self._user()}: Authentication failed: password is incorrect, or there "
                "is no user with such name.",
            )
            return
        for failure in stub._failures:
            if failure.pattern in sql:
                self._exception(failure.code, failure.name, failure.message)
                return
        if insert:
            self._insert(insert, data, params)
        elif sql.startswith("SELECT version(), timezone()"):
            text = f"{VERSION}\t{stub.timezone}\n".encode()
            self._send(200, text, {"X-ClickHouse-Format": "TabSeparated"})
        elif "FROM system.settings" in sql:
            block = native_block(
                [
                    ("name", "String", [s[0] for s in SETTINGS]),
                    ("value", "String", [s[1] for s in SETTINGS]),
                    ("readonly", "UInt8", [s[2] for s in SETTINGS]),
                ]
            )
            self._send(200, block, {"X-ClickHouse-Format": "Native"})
        elif sql.startswith("SELECT 1 AS check"):
            self._send(200, native_block([("check", "UInt8", [1])]), {})
        elif _FORMAT.search(sql):
            self._query(sql, params)
        else:  # a command (DDL, INSERT ... SELECT, ...): nothing to return
            self._send(200, b"", {"X-ClickHouse-Summary": json.dumps({"written_rows": "0"})})

    def _user(self) -> str:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            return base64.b64decode(auth[6:]).decode().split(":", 1)[0]
        return self.headers.get("X-ClickHouse-User", "default")

    def _authorised(self) -> bool:
        stub = self.owner
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
        else:
            user = self.headers.get("X-ClickHouse-User", "default")
            password = self.headers.get("X-ClickHouse-Key", "")
        return user == stub.user and password == stub.password

    def _insert(self, match: re.Match[bytes], data: bytes, params: dict[str, str]) -> None:
        fmt = match.group("fmt").decode()
        if fmt == "Arrow":
            table = pa.ipc.open_file(pa.py_buffer(data)).read_all()
        elif fmt == "ArrowStream":
            table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
        else:
            self._exception(73, "UNKNOWN_FORMAT", f"stub reads Arrow inserts only, not {fmt}")
            return
        cols = match.group("cols")
        columns = [_unquote_ident(c) for c in cols.decode().split(",")] if cols else []
        table_name = _unquote_ident(match.group("table").decode())
        self.owner.inserts.append(Insert(table_name, columns, fmt, table, params))
        summary = {"written_rows": str(table.num_rows), "written_bytes": str(len(data))}
        self._send(200, b"", {"X-ClickHouse-Summary": json.dumps(summary)})

    def _query(self, sql: str, params: dict[str, str]) -> None:
        found = _FORMAT.search(sql)
        assert found is not None
        fmt = found.group(1)
        text = sql[: found.start()].strip()
        found_answer = next((a for a in self.owner._answers if a[0] in text), None)
        if found_answer is None:
            self._exception(60, "UNKNOWN_TABLE", f"stub has no answer for: {text[:80]}")
            return
        _, table, delay_s = found_answer
        if delay_s:
            time.sleep(delay_s)
        server_default = dict((name, value) for name, value, _ in SETTINGS)
        as_string = params.get(
            "output_format_arrow_string_as_string",
            server_default["output_format_arrow_string_as_string"],
        )
        if as_string not in ("1", "true"):
            table = table.cast(
                pa.schema(
                    [
                        f.with_type(pa.binary()) if pa.types.is_string(f.type) else f
                        for f in table.schema
                    ]
                )
            )
        sink = io.BytesIO()
        if fmt.startswith("TabSeparated"):
            lines = ("\t".join(str(v) for v in row.values()) for row in table.to_pylist())
            self._send(200, "".join(f"{line}\n" for line in lines).encode(), {})
            return
        if fmt == "Arrow":
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        elif fmt == "ArrowStream":
            with pa.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        else:
            self._exception(73, "UNKNOWN_FORMAT", f"stub answers Arrow formats only, not {fmt}")
            return
        self._send(200, sink.getvalue(), {"X-ClickHouse-Format": fmt})

    # ---- responses -------------------------------------------------------------
    def _exception(self, code: int, name: str, message: str) -> None:
        body = f"Code: {code}. DB::Exception: {message.rstrip('.')}. ({name}) (version {VERSION})\n"
        self._send(
            _HTTP_STATUS.get(code, 500),
            body.encode(),
            {"X-ClickHouse-Exception-Code": str(code)},
        )

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-ClickHouse-Server-Display-Name", "stub")
        self.send_header("X-ClickHouse-Timezone", self.owner.timezone)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)
