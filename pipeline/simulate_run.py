"""``tokenmeter simulate``: send a ``Simulation``'s traffic to Kafka.

Valid events and exact duplicates go through the producer SDK (validated,
pseudonymised, encoded), as a gateway would send them; deliberately bad messages are
sent as raw bytes so they reach the worker and its dead-letter path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.events import now_ms
from pipeline.produce import UsageProducer
from pipeline.settings import Settings
from pipeline.simulate import Simulation, write_truth


def run_simulation(
    settings: Settings,
    events: int,
    seed: int,
    dup_rate: float,
    bad_rate: float,
    tenants: int,
    truth_path: Path | None,
    console: Console | None = None,
    live_rate: float | None = None,
    late_share: float = 0.0,
) -> dict[str, Any]:
    """Generate and send ``events`` messages; write the truth file if asked. Returns the
    truth as a dict plus ``rate`` (messages/s)."""
    producer = UsageProducer.from_settings(settings)
    sim = Simulation(
        seed=seed, now_ms=now_ms(), tenants=tenants, live_rate=live_rate, late_share=late_share
    )
    started = time.monotonic()
    progress = Progress(
        TextColumn("simulating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=console is None,
    )
    with progress:
        task = progress.add_task("simulate", total=events)
        for i, msg in enumerate(sim.messages(events, dup_rate=dup_rate, bad_rate=bad_rate), 1):
            if msg.kind in ("valid", "duplicate") and msg.record is not None:
                producer.send_record(msg.record)
            else:
                producer.send_raw(msg.key, msg.value)
            if i % 5000 == 0:
                progress.update(task, completed=i)
        progress.update(task, completed=events)
        producer.flush()
    elapsed = time.monotonic() - started
    if truth_path is not None:
        write_truth(sim.truth, truth_path)
    result = sim.truth.to_json()
    result["rate"] = events / elapsed if elapsed > 0 else float(events)
    return result
