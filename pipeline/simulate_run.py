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
) -> dict[str, Any]:
    """Generate and send ``events`` messages; write the truth file if asked. Returns the
    truth as a dict plus ``rate`` (messages/s).

    With ``recon_calls`` > 0, both carriers' reports of that many more cross-carrier calls
    follow the stream, with reconciliation faults injected as ``recon_faults`` says
    (``pipeline.simulate_recon``); the truth file then also holds their exact expected
    ``recon_summary`` counts under ``"recon"`` (the stream's own cross-carrier calls
    count there as ``matched``). The ValueError of an impossible fault spec propagates.
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
        for i, msg in enumerate(sim.messages(events, dup_rate=dup_rate, bad_rate=bad_rate), 1):
            if msg.kind in ("valid", "duplicate") and msg.record is not None:
                producer.send_record(msg.record)
                if recon is not None and msg.kind == "valid" and msg.record.get("transaction_id"):
                    cross.append(msg.record)
            else:
                producer.send_raw(msg.key, msg.value)
            if i % 5000 == 0:
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
    if recon is not None:
        result["recon"] = recon.truth.to_json()
    return result


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
