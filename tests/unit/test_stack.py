"""Unit tests for the stack launcher's error paths and config. No broker, no JVM, no Maven.

Missing tools are simulated by pointing PATH at a directory without them; the Maven
failure by a stand-in ``mvn`` script.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import stack
from pipeline.settings import Settings
from pipeline.stack import StackError
from tests.integration.harness import free_port


def _settings(data_dir: Path, port: int | None = None) -> Settings:
    port = port or free_port()
    return Settings(
        data_dir=data_dir,
        kafka_port=port,
        kafka_controller_port=free_port(),
        kafka_bootstrap=f"127.0.0.1:{port}",
        kafka_partitions=3,
    )


def _script(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def empty_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH is one empty directory: neither java nor mvn can be found."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    return bindir


@pytest.fixture
def infra_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A copy of infra/kafka with the real pom and no resolved jars."""
    infra = tmp_path / "infra"
    infra.mkdir()
    shutil.copy(stack.INFRA_DIR / "pom.xml", infra / "pom.xml")
    shutil.copy(stack.INFRA_DIR / "log4j.properties", infra / "log4j.properties")
    monkeypatch.setattr(stack, "INFRA_DIR", infra)
    yield infra


def test_missing_java_is_a_clear_error(tmp_path: Path, empty_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    with pytest.raises(StackError, match=r"`java` was not found on PATH") as info:
        stack.stack_up(settings, timeout_s=5)
    assert "Java" in str(info.value)  # says what to install
    assert not (settings.kafka_path / "broker.pid").exists()


def test_missing_mvn_is_a_clear_error(tmp_path: Path, empty_path: Path, infra_copy: Path) -> None:
    _script(empty_path, "java", "exit 0\n")
    with pytest.raises(StackError, match=r"`mvn` was not found on PATH"):
        stack.ensure_jars(_settings(tmp_path / "data"))


def test_missing_java_for_maven_is_a_clear_error(
    tmp_path: Path, empty_path: Path, infra_copy: Path
) -> None:
    _script(empty_path, "mvn", "exit 0\n")
    with pytest.raises(StackError, match=r"`java` was not found on PATH"):
        stack.ensure_jars(_settings(tmp_path / "data"))


def test_maven_failure_reports_the_tail_of_its_output(
    tmp_path: Path, empty_path: Path, infra_copy: Path
) -> None:
    _script(empty_path, "java", "exit 0\n")
    lines = "".join(f"echo 'maven line {i}'\n" for i in range(50))
    _script(
        empty_path, "mvn", lines + "echo '[ERROR] Could not resolve dependencies' >&2\nexit 1\n"
    )
    with pytest.raises(StackError) as info:
        stack.ensure_jars(_settings(tmp_path / "data"))
    message = str(info.value)
    assert "exit 1" in message
    assert "Could not resolve dependencies" in message
    assert "maven line 49" in message
    assert "maven line 10\n" not in message  # only the tail
    assert not (infra_copy / "lib" / ".pom.sha256").exists()


def test_jars_already_resolved_need_no_tools(
    tmp_path: Path, empty_path: Path, infra_copy: Path
) -> None:
    lib = infra_copy / "lib"
    lib.mkdir()
    (lib / "kafka_2.13-3.9.1.jar").write_bytes(b"")
    digest = hashlib.sha256((infra_copy / "pom.xml").read_bytes()).hexdigest()
    (lib / ".pom.sha256").write_text(digest + "\n")
    assert stack.ensure_jars(_settings(tmp_path / "data")) == lib

    # a changed pom must re-resolve, which needs the tools
    (infra_copy / "pom.xml").write_text((infra_copy / "pom.xml").read_text() + "\n<!-- -->\n")
    with pytest.raises(StackError, match="not found on PATH"):
        stack.ensure_jars(_settings(tmp_path / "data"))


def test_port_taken_by_another_process_is_refused(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = int(squatter.getsockname()[1])
        settings = _settings(tmp_path / "data", port=port)
        with pytest.raises(StackError, match=rf"127\.0\.0\.1:{port} .* already in use"):
            stack.stack_up(settings, timeout_s=5)
    assert not (settings.kafka_path / "broker.pid").exists()


def test_server_properties_bind_localhost_only(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    props = dict(
        line.split("=", 1)
        for line in stack.render_server_properties(settings).splitlines()
        if line and not line.startswith("#")
    )
    assert props["listeners"] == (
        f"PLAINTEXT://127.0.0.1:{settings.kafka_port},"
        f"CONTROLLER://127.0.0.1:{settings.kafka_controller_port}"
    )
    assert props["advertised.listeners"] == f"PLAINTEXT://127.0.0.1:{settings.kafka_port}"
    assert props["controller.quorum.voters"] == f"1@127.0.0.1:{settings.kafka_controller_port}"
    assert props["process.roles"] == "broker,controller"
    assert props["num.partitions"] == "3"
    assert props["auto.create.topics.enable"] == "false"
    assert props["offsets.topic.replication.factor"] == "1"
    assert Path(props["log.dirs"]) == settings.kafka_path / "logs"


def test_down_without_a_broker_returns_false(tmp_path: Path) -> None:
    assert stack.stack_down(_settings(tmp_path / "never-started")) is False


def test_down_never_signals_a_process_that_is_not_our_broker(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    settings.kafka_path.mkdir(parents=True)
    pid_file = settings.kafka_path / "broker.pid"
    pid_file.write_text(f"{os.getpid()}\n")  # alive, but this is pytest, not kafka.Kafka
    assert stack.stack_down(settings) is False
    assert not pid_file.exists()  # the stale pid file is cleaned up


def test_status_when_down(tmp_path: Path) -> None:
    settings = _settings(tmp_path / "data")
    status = stack.stack_status(settings)
    assert status.running is False
    assert status.pid is None
    assert status.topics == {}
    assert status.bootstrap == f"127.0.0.1:{settings.kafka_port}"
    assert status.kafka_version == "3.9.1"
    assert status.data_dir == settings.kafka_path
    assert status.log_file == settings.kafka_path / "server.log"
