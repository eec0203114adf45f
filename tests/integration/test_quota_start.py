"""The quota service's start rides out Kafka going away in the middle of it.

A worker starts its quota service in the background (topics, definitions, emitted alerts,
usage). When a broker outage begins before that is done, each attempt fails (creating
the topics times out) and is retried with backoff; the worker must stay up and serve 503
for quotas meanwhile. It once raised instead, and faust stopped the whole worker (exit 1)
in the broker-outage drill (tests/integration/faults/test_broker_outage.py).

Kafka here is the real test broker behind a gate: a port where nothing listens (the
outage), then a forwarder to the broker (it is back).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import uuid
from pathlib import Path

import pytest

from pipeline.quota.service import wall_clock_ms
from pipeline.settings import load_settings
from pipeline.warehouse import Warehouse
from tests.integration.harness import free_port
from tests.unit.test_quota_service import make_service

pytestmark = pytest.mark.integration


class Gate:
    """A bootstrap address that refuses connections until ``open()``, then forwards
    them to ``target`` (the broker's metadata sends clients on to the broker itself)."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self._server: socket.socket | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def open(self) -> None:
        server = socket.create_server(("127.0.0.1", self.port))
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                client, _ = server.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        if self._server is not None:
            self._server.close()


def test_a_kafka_outage_during_the_quota_services_start_is_retried_not_fatal(
    bootstrap: str, warehouse: Warehouse, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate(bootstrap)
    run = uuid.uuid4().hex[:8]
    settings = load_settings(
        data_dir=tmp_path / "data",
        kafka_bootstrap=gate.address,
        topic_usage=f"usage-events-{run}",
        topic_quota_events=f"quota-events-{run}",
    )
    service = make_service(
        settings,
        warehouse,
        tmp_path,
        wall_clock_ms,
        kafka=True,
        kafka_timeout_s=1.0,  # an attempt gives up on Kafka after 1 s
    )

    def retries() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "tokenmeter.quota" and "quota service not started yet" in r.getMessage()
        ]

    async def scenario() -> None:
        task = asyncio.create_task(service.start(retry_max_s=1.0))
        try:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while len(retries()) < 2:  # Kafka away: two attempts failed, none was fatal
                if task.done():
                    task.result()  # raises what ended the start
                    raise AssertionError("the start ended while Kafka was away")
                assert loop.time() < deadline, "no retried attempt within 60 s"
                await asyncio.sleep(0.1)
            assert not service.started
            assert f"creating topics on {gate.address} failed" in retries()[0]

            service.kafka_timeout_s = 30.0  # Kafka is back: an attempt may take its time
            gate.open()
            await asyncio.wait_for(task, timeout=120)
            assert service.started
        finally:
            task.cancel()
            await service.stop()

    caplog.set_level(logging.WARNING, logger="tokenmeter.quota")
    try:
        asyncio.run(scenario())
    finally:
        gate.close()
