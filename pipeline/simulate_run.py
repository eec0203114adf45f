"""``tokenmeter simulate``: send a ``Simulation``'s traffic to Kafka.

Valid events and exact duplicates go through the producer SDK (validated,
pseudonymised, encoded), as a gateway would send them; deliberately bad messages are
sent as raw bytes so they reach the worker and its dead-letter path.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from pipeline.events import now_ms
from pipeline.produce import UsageProducer
from pipeline.settings import Settings
from pipeline.simulate import Simulation, write_truth
from pipeline.simulate_recon import FAULTS, ReconSimulation, write_recon_truth


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
    recon_calls: int = 0,
    recon_faults: ReconFaults | None = None,
    send_rate: float | None = None,
) -> dict[str, Any]:
    """Generate and send ``events`` messages; write the truth file if asked. Returns the
    truth as a dict plus ``rate`` (messages/s).

    With ``recon_calls`` > 0, both carriers' reports of that many more cross-carrier calls
    follow the stream, with reconciliation faults injected as ``recon_faults`` says
    (``pipeline.simulate_recon``); the truth file then also holds their exact expected
    ``recon_summary`` counts under ``"recon"`` (the stream's own cross-carrier calls
    count there as ``matched``). The ValueError of an impossible fault spec propagates.

    ``send_rate`` paces sending to that many messages per second, as a fleet of
    gateways would. Everything sent is flushed every ``FLUSH_EVERY`` messages, so a
    long run survives a broker outage the way a gateway does: what Kafka does not
    acknowledge within the spool deadline goes to the producer's spool on disk and is
    re-sent by a later flush once the broker answers.
    """
    producer = UsageProducer.from_settings(settings)
    start_ms = now_ms()
    sim = Simulation(
        seed=seed, now_ms=start_ms, tenants=tenants, live_rate=live_rate, late_share=late_share
    )
    recon: ReconSimulation | None = None
    recon_records: list[dict[str, Any]] = []
    if recon_calls:
        recon = (recon_faults or ReconFaults()).simulation(
            seed, start_ms, recon_calls, settings.lateness_limit_s
        )
        recon_records = recon.records()  # generated first: a bad spec fails before sending
    cross: list[dict[str, Any]] = []
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
        pace = Pacer(send_rate)
        for i, msg in enumerate(sim.messages(events, dup_rate=dup_rate, bad_rate=bad_rate), 1):
            pace.wait(i)
            if msg.kind in ("valid", "duplicate") and msg.record is not None:
                producer.send_record(msg.record)
                if recon is not None and msg.kind == "valid" and msg.record.get("transaction_id"):
                    cross.append(msg.record)
            else:
                producer.send_raw(msg.key, msg.value)
            if i % FLUSH_EVERY == 0:
                producer.flush()
                progress.update(task, completed=i)
        progress.update(task, completed=events)
        if recon is not None:
            for rec in recon_records:
                producer.send_record(rec)
                sim.truth.messages += 1
                sim.truth.add_valid(rec)
            recon.truth.add_matched_calls(cross)
        producer.flush()
    elapsed = time.monotonic() - started
    if truth_path is not None:
        write_truth(sim.truth, truth_path)
        if recon is not None:
            write_recon_truth(recon.truth, truth_path)
    result = sim.truth.to_json()
    result["rate"] = sim.truth.messages / elapsed if elapsed > 0 else float(events)
    result["spooled"] = producer.spooled
    result["spool_left"] = len(producer.spool) if producer.spool is not None else 0
    if recon is not None:
        result["recon"] = recon.truth.to_json()
    return result


FLUSH_EVERY = 5000


class Pacer:
    """Sleeps so that message ``i`` (1-based) leaves no earlier than ``i / rate`` s after
    the first; no pacing without a rate."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()

    def wait(self, i: int) -> None:
        if self.rate is None or i % 100:
            return  # checking every 100 messages keeps pacing cheap and smooth enough
        ahead = self.start + i / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


@dataclass(frozen=True)
class ReconFaults:
    """``--recon-faults``: one rate spread evenly over the six discrepancy categories
    (``0.07``), or a rate per category (``token_mismatch=0.01,duplicate=0.02``; the
    others get none); counts are ``round(calls * rate)``, exact in the truth file."""

    rate: float = 0.0
    per_category: tuple[tuple[str, float], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ReconFaults:
        """Parse the option's text; ValueError with a readable message if it is wrong."""
        text = text.strip()
        if "=" not in text:
            try:
                rate = float(text)
            except ValueError:
                raise ValueError(
                    f"{text!r} is neither a rate (0.07) nor category=rate pairs"
                ) from None
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"the rate {text} must lie in [0, 1]")
            return cls(rate=rate)
        pairs: dict[str, float] = {}
        for part in text.split(","):
            name, _, value = part.partition("=")
            name = name.strip()
            if name not in FAULTS:
                raise ValueError(f"unknown category {name!r}; choose from {', '.join(FAULTS)}")
            try:
                rate = float(value)
            except ValueError:
                raise ValueError(f"{name}: {value.strip()!r} is not a rate") from None
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name}: the rate {value.strip()} must lie in [0, 1]")
            pairs[name] = rate
        if sum(pairs.values()) > 1.0:
            raise ValueError("the category rates add up to more than 1")
        return cls(per_category=tuple(pairs.items()))

    def simulation(
        self, seed: int, start_ms: int, calls: int, lateness_limit_s: int
    ) -> ReconSimulation:
        """The recon simulation for a stream sent at ``start_ms``."""
        faults = None
        if self.per_category:
            faults = {name: round(calls * rate) for name, rate in self.per_category}
        return ReconSimulation.for_stream(
            seed,
            start_ms,
            calls,
            fault_rate=self.rate,
            faults=faults,
            lateness_limit_s=lateness_limit_s,
        )
