"""The local Kafka stack: one single-node KRaft broker under the data dir, on 127.0.0.1.

``tokenmeter stack up|down|status`` call the four public functions here:

- ``ensure_jars``: resolve the broker's jars from Maven Central (``infra/kafka/pom.xml``)
  into ``infra/kafka/lib/``, once per pom version.
- ``stack_up``: format storage once, start the broker detached, wait until it answers,
  create the topics declared in ``pipeline.topics.all_topics``. Idempotent.
- ``stack_down``: stop the broker ``stack_up`` started, and only that one. Idempotent.
- ``stack_status``: what is running, where, with which topics.

Files under ``settings.kafka_path`` (``<data_dir>/kafka``):

- ``server.properties``: rewritten from the settings on every start
- ``cluster.id``: the KRaft cluster id, generated once
- ``logs/``: the broker's log dir (``meta.properties`` marks it formatted)
- ``broker.pid``: pid of the running broker; the only proof that it is ours
- ``server.log``: the broker's log4j log; ``broker.out``: its stdout/stderr (JVM errors)

Kafka 3.9.x, not 4.x: 4.x dropped old protocol versions (KIP-896) that aiokafka, used by
faust, may still send. Everything binds to 127.0.0.1.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ClusterMetadata, NewTopic

from pipeline.settings import PRIVATE_UMASK, Settings, private_dir, private_umask
from pipeline.topics import TopicSpec, all_topics

if TYPE_CHECKING:
    from rich.console import Console

HOST = "127.0.0.1"
INFRA_DIR = Path(__file__).resolve().parent.parent / "infra" / "kafka"

_POM = "pom.xml"
_LOG4J = "log4j.properties"
_LIB = "lib"
_JARS_MARKER = ".pom.sha256"
_BROKER_MAIN = "kafka.Kafka"
_STOP_WAIT_S = 30.0
_LOG_TAIL_LINES = 20
_MAVEN_TIMEOUT_S = 900.0
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

# Brokers this Python process started: lets ``_alive`` reap them (a dead child stays a
# zombie, and a zombie still answers ``kill(pid, 0)``) and avoids Popen's "still running"
# warning when the handle is dropped while the detached broker keeps running.
_children: dict[int, subprocess.Popen[bytes]] = {}


class StackError(Exception):
    """The stack cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class StackStatus:
    """What ``stack status`` reports.

    ``running`` is true only for a broker started by ``stack_up`` from this data dir that
    answers a metadata request. ``data_dir`` is the broker's directory
    (``settings.kafka_path``). ``topics`` maps every non-internal topic to its partition
    count, empty when the broker is down. ``log_file`` is the broker's log4j log.
    """

    running: bool
    pid: int | None
    bootstrap: str
    kafka_version: str
    data_dir: Path
    topics: dict[str, int]
    log_file: Path


# ---------------------------------------------------------------- paths and files


def _bootstrap(settings: Settings) -> str:
    return f"{HOST}:{settings.kafka_port}"


def _pid_file(settings: Settings) -> Path:
    return settings.kafka_path / "broker.pid"


def _properties_file(settings: Settings) -> Path:
    return settings.kafka_path / "server.properties"


def _log_dir(settings: Settings) -> Path:
    return settings.kafka_path / "logs"


def _log_file(settings: Settings) -> Path:
    return settings.kafka_path / "server.log"


def _out_file(settings: Settings) -> Path:
    return settings.kafka_path / "broker.out"


def kafka_version() -> str:
    """The Kafka version the pom resolves (its ``kafka.version`` property), e.g. ``3.9.1``."""
    root = ET.parse(INFRA_DIR / _POM).getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    node = root.find("m:properties/m:kafka.version", ns)
    if node is None or not (node.text or "").strip():
        raise StackError(f"{INFRA_DIR / _POM}: no <kafka.version> property")
    return (node.text or "").strip()


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file, or '' if it does not exist."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 64 * 1024))
            data = fh.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _tail_text(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``text``, without terminal colour codes (Maven's)."""
    return "\n".join(_ANSI.sub("", text).strip().splitlines()[-lines:])


def _broker_logs(settings: Settings) -> str:
    """Tails of the broker's log and stdout, labelled, for error messages."""
    parts = []
    for path in (_log_file(settings), _out_file(settings)):
        tail = _tail(path)
        if tail:
            parts.append(f"--- last lines of {path} ---\n{tail}")
    return "\n".join(parts) if parts else "(the broker wrote no log)"


@contextlib.contextmanager
def _spinner(console: Console | None, message: str) -> Iterator[None]:
    if console is None:
        yield
        return
    with console.status(message):
        yield


def _say(console: Console | None, message: str) -> None:
    if console is not None:
        console.print(message)


@contextlib.contextmanager
def _locked(settings: Settings) -> Iterator[None]:
    """Serialise ``up`` and ``down`` on one data dir across processes."""
    private_dir(settings.kafka_path)
    with (settings.kafka_path / "stack.lock").open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _require(tool: str, why: str) -> str:
    """Absolute path of ``tool`` on PATH, or a StackError saying how to get it."""
    path = shutil.which(tool)
    if path is None:
        raise StackError(
            f"`{tool}` was not found on PATH; it is needed to {why}. "
            "Install a Java 17+ JDK and Apache Maven (Debian: apt-get install "
            "openjdk-17-jdk-headless maven) and try again."
        )
    return path


# ---------------------------------------------------------------- jars


def ensure_jars(settings: Settings, console: Console | None = None) -> Path:
    """Resolve the broker's jars into ``infra/kafka/lib/`` unless they are already there.

    Takes the settings (for symmetry with the other commands; the jars are shared by every
    data dir) and an optional console for progress. Returns the lib dir. Maven runs only
    when the jars are missing or were resolved from a different pom (a marker file holds
    the pom's sha256). Raises ``StackError`` if ``java`` or ``mvn`` is not on PATH or Maven
    fails (with the tail of its output).
    """
    del settings  # the jars do not depend on the data dir
    pom = INFRA_DIR / _POM
    lib = INFRA_DIR / _LIB
    marker = lib / _JARS_MARKER
    digest = hashlib.sha256(pom.read_bytes()).hexdigest()
    if marker.is_file() and marker.read_text().strip() == digest and any(lib.glob("kafka_*.jar")):
        return lib

    _require("java", "run Maven and the Kafka broker")
    mvn = _require("mvn", "download the Kafka broker's jars from Maven Central")
    # Resolve into a staging dir inside lib/ (ignored by git), then swap the jars in and
    # write the marker last: an interrupted run leaves no marker and is redone.
    staging = lib / ".incoming"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    cmd = [
        mvn, "-q", "-B", "-Dstyle.color=never", "-f", str(pom),
        "dependency:copy-dependencies",
        f"-DoutputDirectory={staging}", "-DincludeScope=runtime",
    ]  # fmt: skip
    with _spinner(console, f"resolving Kafka {kafka_version()} jars with Maven"):
        try:
            proc = subprocess.run(
                cmd,
                cwd=INFRA_DIR,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=_MAVEN_TIMEOUT_S,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            shutil.rmtree(staging, ignore_errors=True)
            out = (exc.output or b"").decode("utf-8", "replace")
            raise StackError(
                f"Maven did not finish within {_MAVEN_TIMEOUT_S:.0f} s:\n{_tail_text(out)}"
            ) from None
    output = proc.stdout.decode("utf-8", "replace")
    if proc.returncode != 0 or not any(staging.glob("kafka_*.jar")):
        shutil.rmtree(staging, ignore_errors=True)
        raise StackError(
            f"Maven could not resolve the Kafka jars (exit {proc.returncode}; "
            f"command: {' '.join(cmd)}):\n{_tail_text(output) or '(no output)'}"
        )
    marker.unlink(missing_ok=True)
    for old in lib.glob("*.jar"):
        old.unlink()
    for new in staging.glob("*.jar"):
        new.rename(lib / new.name)
    shutil.rmtree(staging, ignore_errors=True)
    marker.write_text(digest + "\n")
    _say(console, f"resolved {sum(1 for _ in lib.glob('*.jar'))} jars into {lib}")
    return lib


# ---------------------------------------------------------------- broker config


def render_server_properties(settings: Settings) -> str:
    """The ``server.properties`` of the single-node KRaft broker for these settings.

    Broker and controller in one process (node id 1), both listeners on 127.0.0.1,
    replication factors 1, no topic auto-creation, unlimited retention.
    """
    port, cport = settings.kafka_port, settings.kafka_controller_port
    lines = [
        "# Written by `tokenmeter stack up` on every start; edits are overwritten.",
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{HOST}:{cport}",
        f"listeners=PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{cport}",
        f"advertised.listeners=PLAINTEXT://{HOST}:{port}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        "controller.listener.names=CONTROLLER",
        f"log.dirs={_log_dir(settings)}",
        f"num.partitions={settings.kafka_partitions}",
        "default.replication.factor=1",
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "min.insync.replicas=1",
        "group.initial.rebalance.delay.ms=0",
        "auto.create.topics.enable=false",
        # usage events are the source of truth for re-rating: keep them
        "log.retention.hours=-1",
        "delete.topic.enable=true",
    ]
    return "\n".join(lines) + "\n"


def _cluster_id(settings: Settings) -> str:
    """The KRaft cluster id of this data dir, generated once and kept in ``cluster.id``.

    Same encoding as Kafka's ``Uuid.randomUuid``: 16 random bytes, url-safe base64 without
    padding, never starting with '-' (the storage tool would read it as an option).
    """
    path = settings.kafka_path / "cluster.id"
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip()
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            break
    path.write_text(cid + "\n")
    return cid


def _jvm_logging_args(settings: Settings) -> list[str]:
    return [
        f"-Dlog4j.configuration={(INFRA_DIR / _LOG4J).as_uri()}",
        f"-Dkafka.logs.dir={settings.kafka_path}",
    ]


def _format_storage(settings: Settings, java: str, lib: Path, console: Console | None) -> None:
    """Format the log dir once (skipped when ``meta.properties`` exists)."""
    if (_log_dir(settings) / "meta.properties").is_file():
        return
    cmd = [
        java, "-Xmx256m", "-cp", f"{lib}/*", *_jvm_logging_args(settings),
        "kafka.tools.StorageTool", "format",
        "-t", _cluster_id(settings), "-c", str(_properties_file(settings)),
    ]  # fmt: skip
    with _spinner(console, "formatting Kafka storage"):
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120, check=False
        )
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).decode("utf-8", "replace")
        raise StackError(
            f"formatting the Kafka log dir {_log_dir(settings)} failed "
            f"(exit {proc.returncode}):\n{_tail_text(out) or '(no output)'}"
        )


# ---------------------------------------------------------------- processes and ports


def _cmdline(pid: int) -> list[str] | None:
    """The argv of a live process, or None if it does not exist (Linux /proc, else ps)."""
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            raw = proc.read_bytes()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]
    ps = shutil.which("ps")
    if ps is None:
        return None
    res = subprocess.run(
        [ps, "-ww", "-o", "args=", "-p", str(pid)], capture_output=True, check=False
    )
    out = res.stdout.decode("utf-8", "replace").strip()
    return out.split() if res.returncode == 0 and out else None


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running (not zombie) process."""
    child = _children.get(pid)
    if child is not None:
        if child.poll() is not None:
            del _children[pid]
            return False
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    with contextlib.suppress(OSError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        if stat.rpartition(")")[2].split()[0] == "Z":
            return False
    return True


def _is_our_broker(settings: Settings, pid: int) -> bool:
    """Whether ``pid`` is a java ``kafka.Kafka`` running this data dir's server.properties."""
    if not _alive(pid):
        return False
    argv = _cmdline(pid)
    if not argv:
        return False
    joined = " ".join(argv) + " "  # ps cannot tell spaces in paths from separators
    return (
        Path(argv[0]).name.startswith("java")
        and f" {_BROKER_MAIN} " in joined
        and f" {_properties_file(settings)} " in joined
    )


def _read_pid(settings: Settings) -> int | None:
    try:
        return int(_pid_file(settings).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _our_pid(settings: Settings) -> int | None:
    """The pid of this data dir's broker if it is alive and really ours, else None."""
    pid = _read_pid(settings)
    if pid is not None and _is_our_broker(settings, pid):
        return pid
    return None


def _port_open(port: int) -> bool:
    """Whether something accepts TCP connections on 127.0.0.1:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((HOST, port)) == 0


def _port_free(port: int) -> bool:
    """Whether 127.0.0.1:port can be bound (SO_REUSEADDR, as the JVM does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _admin(bootstrap: str, log_level: int = 4) -> AdminClient:
    # log_level 4 (warning): a timed-out metadata probe while the broker starts would
    # otherwise print librdkafka's info-level "Purging unserved events" to stderr.
    return AdminClient({"bootstrap.servers": bootstrap, "log_level": log_level})


def _metadata(bootstrap: str, timeout_s: float, log_level: int = 4) -> ClusterMetadata | None:
    """A metadata response from the broker, or None if it does not answer in time.
    ``log_level`` 0 keeps librdkafka's connection errors off stderr."""
    admin = _admin(bootstrap, log_level)
    try:
        return admin.list_topics(timeout=timeout_s)
    except KafkaException:
        return None


def _wait_ready(
    settings: Settings, proc: subprocess.Popen[bytes] | None, pid: int, timeout_s: float
) -> None:
    """Block until the broker lists itself in a metadata response.

    Fails fast if the process exits; raises ``StackError`` with the log tail on timeout.
    """
    deadline = time.monotonic() + timeout_s
    bootstrap = _bootstrap(settings)
    while time.monotonic() < deadline:
        exited = proc.poll() is not None if proc is not None else not _alive(pid)
        if exited:
            code = f" with code {proc.returncode}" if proc is not None else ""
            raise StackError(
                f"the Kafka broker (pid {pid}) exited{code} during startup.\n"
                f"{_broker_logs(settings)}"
            )
        # A TCP probe first: librdkafka would log every refused connection to stderr.
        if _port_open(settings.kafka_port):
            md = _metadata(bootstrap, timeout_s=min(5.0, max(0.5, deadline - time.monotonic())))
            # The broker lists itself only once it is unfenced and can host partitions.
            if md is not None and md.brokers:
                return
        time.sleep(0.2)
    raise StackError(
        f"the Kafka broker (pid {pid}) did not answer on {bootstrap} within "
        f"{timeout_s:.0f} s.\n{_broker_logs(settings)}"
    )


def _signal_and_wait(pid: int, wait_s: float) -> None:
    """SIGTERM (controlled shutdown), then SIGKILL if still alive after ``wait_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not _alive(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)


# ---------------------------------------------------------------- topics


def create_topics(bootstrap: str, topics: list[TopicSpec], timeout_s: float = 30.0) -> None:
    """Create ``topics`` on ``bootstrap`` (replication factor 1; one request for all);
    existing ones are left as they are, whatever their config. Raises ``StackError`` for
    any other failure, also when no broker answers within ``timeout_s``."""
    if not topics:
        return
    admin = _admin(bootstrap)
    new = [
        NewTopic(t.name, num_partitions=t.partitions, replication_factor=1, config=dict(t.config))
        for t in topics
    ]
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    failures = []
    for name, fut in futures.items():
        # exception() rather than result(): a raised exception would keep this frame, and
        # with it the client, alive in a reference cycle through the future; a lingering
        # client logs "connection refused" to stderr once the broker stops.
        exc = fut.exception(timeout=2 * timeout_s)
        if exc is None:
            continue
        err = exc.args[0] if exc.args else exc
        if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
            continue
        failures.append(f"{name}: {err}")
    if failures:
        raise StackError(f"creating topics on {bootstrap} failed: " + "; ".join(failures))


def ensure_topics(
    settings: Settings,
    topics: Mapping[str, Mapping[str, str]],
    *,
    partitions: int | None = None,
    bootstrap: str | None = None,
) -> None:
    """Create ``topics`` (name -> topic config, e.g. ``{"cleanup.policy": "compact"}``).

    Each gets ``partitions`` partitions (default ``settings.kafka_partitions``) and
    replication factor 1, on ``bootstrap`` (default ``settings.kafka_bootstrap``). Topics
    that already exist are left as they are, whatever their config. Returns nothing;
    raises ``StackError`` for any other failure.
    """
    count = partitions if partitions is not None else settings.kafka_partitions
    create_topics(
        bootstrap or settings.kafka_bootstrap,
        [TopicSpec(name, count, dict(conf)) for name, conf in topics.items()],
    )


def require_worker_topics(settings: Settings, timeout_s: float = 10.0) -> None:
    """Before a worker starts: a broker answers at ``settings.kafka_bootstrap`` and the
    topics it consumes exist. Raises ``StackError`` naming the setting otherwise (a
    worker would fail with a traceback, or run and consume nothing)."""
    bootstrap = settings.kafka_bootstrap
    md = _metadata(bootstrap, timeout_s, log_level=0)  # the error below says it all
    if md is None:
        raise StackError(
            f"TOKENMETER_KAFKA_BOOTSTRAP: no Kafka broker answers at {bootstrap} within "
            f"{timeout_s:.0f} s (start one with `tokenmeter stack up`)"
        )
    needed = {
        "TOKENMETER_TOPIC_USAGE": settings.topic_usage,
        "TOKENMETER_TOPIC_DEAD_LETTERS": settings.topic_dead_letters,
    }
    missing = [f"{name}={topic}" for name, topic in needed.items() if topic not in md.topics]
    if missing:
        raise StackError(
            f"{', '.join(missing)}: no such topic on {bootstrap} "
            "(`tokenmeter stack up` creates the topics)"
        )


# ---------------------------------------------------------------- public commands


def stack_status(settings: Settings) -> StackStatus:
    """Report this data dir's broker: running, pid, bootstrap, version, paths, topics.

    Takes the settings; starts and changes nothing. ``running`` needs the pid file, a live
    ``kafka.Kafka`` process on our server.properties, and an answer on the port.
    """
    pid = _our_pid(settings)
    topics: dict[str, int] = {}
    running = False
    if pid is not None and _port_open(settings.kafka_port):
        md = _metadata(_bootstrap(settings), timeout_s=5.0)
        if md is not None:
            running = True
            topics = {
                name: len(t.partitions)
                for name, t in sorted(md.topics.items())
                if not name.startswith("__")
            }
    return StackStatus(
        running=running,
        pid=pid,
        bootstrap=_bootstrap(settings),
        kafka_version=kafka_version(),
        data_dir=settings.kafka_path,
        topics=topics,
        log_file=_log_file(settings),
    )


def stack_up(
    settings: Settings, console: Console | None = None, timeout_s: float = 60
) -> StackStatus:
    """Start the local broker (if not already running) and create ``topics.all_topics``.

    Takes the settings, an optional console for progress and the seconds to wait for the
    broker to answer. Returns its status. Idempotent: a running broker from this data dir
    is reused. Raises ``StackError`` if ``java``/``mvn`` are missing, Maven fails, a port
    is taken by another process, or the broker does not come up (with its log tail).
    """
    bootstrap = _bootstrap(settings)
    # the broker's log segments hold every raw usage event: the data dir and all the
    # stack writes in it (the broker's own files too: it inherits the umask) owner-only
    tightened = settings.private_data_dir()
    if tightened:
        _say(console, f"[yellow]note:[/] {tightened}")
    with private_umask(), _locked(settings):
        pid = _our_pid(settings)
        if pid is not None:
            try:
                _wait_ready(settings, None, pid, timeout_s)
            except StackError as exc:
                raise StackError(f"{exc}\n`tokenmeter stack down` stops it.") from None
            _say(console, f"Kafka broker already running (pid {pid}) on {bootstrap}")
        else:
            _pid_file(settings).unlink(missing_ok=True)  # stale: dead or not ours
            for port, what in (
                (settings.kafka_port, "broker"),
                (settings.kafka_controller_port, "controller"),
            ):
                if not _port_free(port):
                    raise StackError(
                        f"{HOST}:{port} (the {what} port) is already in use by another "
                        f"process, not by a broker started from {settings.kafka_path}. "
                        "Stop that process or choose other ports (TOKENMETER_KAFKA_PORT, "
                        "TOKENMETER_KAFKA_CONTROLLER_PORT)."
                    )
            java = _require("java", "run the Kafka broker")
            lib = ensure_jars(settings, console)
            private_dir(_log_dir(settings))
            _properties_file(settings).write_text(render_server_properties(settings))
            _format_storage(settings, java, lib, console)
            pid = _start_broker(settings, java, lib, console, timeout_s)
        with _spinner(console, "creating topics"):
            create_topics(bootstrap, all_topics(settings))
    if settings.kafka_bootstrap != bootstrap:
        _say(
            console,
            f"[yellow]note:[/] the broker listens on {bootstrap} but TOKENMETER_KAFKA_BOOTSTRAP "
            f"is {settings.kafka_bootstrap}",
        )
    return stack_status(settings)


def _start_broker(
    settings: Settings, java: str, lib: Path, console: Console | None, timeout_s: float
) -> int:
    """Spawn the broker detached, record its pid, wait until it answers; return the pid."""
    cmd = [
        java, f"-Xmx{settings.kafka_heap_mb}m", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
        "-XX:+ExitOnOutOfMemoryError", "-Djava.awt.headless=true",
        "-cp", f"{lib}/*", *_jvm_logging_args(settings),
        _BROKER_MAIN, str(_properties_file(settings)),
    ]  # fmt: skip
    started = time.monotonic()
    with _spinner(console, f"starting Kafka broker on {_bootstrap(settings)}"):
        with _out_file(settings).open("ab") as out:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=settings.kafka_path,
                start_new_session=True,  # survives the CLI and its Ctrl-C
                umask=PRIVATE_UMASK,  # log segments 0600 in 0700 directories
            )
        _children[proc.pid] = proc
        _pid_file(settings).write_text(f"{proc.pid}\n")
        try:
            _wait_ready(settings, proc, proc.pid, timeout_s)
        except StackError:
            # leave nothing half-started behind
            _signal_and_wait(proc.pid, wait_s=5.0)
            _pid_file(settings).unlink(missing_ok=True)
            raise
    _say(
        console,
        f"Kafka broker started (pid {proc.pid}) on {_bootstrap(settings)} "
        f"in {time.monotonic() - started:.1f} s; log: {_log_file(settings)}",
    )
    return proc.pid


def stack_down(settings: Settings, console: Console | None = None) -> bool:
    """Stop the broker that ``stack_up`` started from this data dir.

    Takes the settings and an optional console. Signals only a process whose command line
    is ``kafka.Kafka`` with our server.properties: SIGTERM, up to 30 s for a controlled
    shutdown, then SIGKILL. Removes the pid file. Returns whether a broker was stopped;
    calling it again returns False.
    """
    if not settings.kafka_path.is_dir():
        return False
    with _locked(settings):
        pid = _our_pid(settings)
        if pid is None:
            _pid_file(settings).unlink(missing_ok=True)  # stale or absent
            _say(console, "no Kafka broker from this data dir is running")
            return False
        with _spinner(console, f"stopping Kafka broker (pid {pid})"):
            _signal_and_wait(pid, _STOP_WAIT_S)
        if _alive(pid):
            raise StackError(f"the Kafka broker (pid {pid}) survived SIGKILL")
        _pid_file(settings).unlink(missing_ok=True)
        _children.pop(pid, None)
    _say(console, f"Kafka broker (pid {pid}) stopped")
    return True
