"""Coverage-guided fuzzing of decode + validate (atheris, i.e. libFuzzer) for hostile input.

Not collected by pytest and not a dependency: install atheris by hand, then run for as
long as you like, e.g. three minutes:

    .venv/bin/pip install atheris
    .venv/bin/python tests/perf/fuzz_ingest_atheris.py -max_total_time=180 [CORPUS_DIR]

Each input becomes one batch for ``IngestStage.process`` (the real codec, rules and dedup
index). The first byte picks how the rest is used: as a whole Kafka value, as an Avro body
behind our header, or as choices that mutate a valid event field by field (so libFuzzer
reaches the validator, not only the decoder). The same checks as the hypothesis
properties in tests/integration/faults/test_hostile_input.py run on every batch; a
failed check or any exception is a finding (libFuzzer writes the input to crash-*).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

with atheris.instrument_imports():
    from pipeline import events, serde
    from pipeline.dead_letters import prepare_dead_letter
    from pipeline.events import Rules
    from pipeline.metering.dedup import DedupIndex
    from pipeline.stages import ingest
    from pipeline.stages.ingest import IngestStage, RawMessage

from tests.integration.faults import hostile  # noqa: E402
from tests.integration.faults.test_hostile_input import (  # noqa: E402
    KEY,
    NOW,
    check_outcomes,
)

CODEC = hostile.CODEC
HEADER = serde.MAGIC + CODEC.fingerprint
FIELDS = [f["name"] for f in hostile.V1["fields"]]
_ = (events, ingest, prepare_dead_letter)  # instrumented modules


def _mutated(fdp: atheris.FuzzedDataProvider) -> bytes:
    rec: dict[str, Any] = hostile.valid_record(fdp.ConsumeIntInRange(0, 1000), NOW)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        name = FIELDS[fdp.ConsumeIntInRange(0, len(FIELDS) - 1)]
        kind = fdp.ConsumeIntInRange(0, 3)
        if name in ("event_time", "latency_ms", *hostile.TOKEN_FIELDS):
            rec[name] = fdp.ConsumeIntInRange(hostile.INT64_MIN, hostile.INT64_MAX)
        elif name == "attributes":
            n = fdp.ConsumeIntInRange(0, 80)
            rec[name] = {fdp.ConsumeUnicodeNoSurrogates(8): "v" for _ in range(n)}
        elif kind == 0 and name in hostile.ENUMS:
            rec[name] = sorted(hostile.ENUMS[name])[fdp.ConsumeIntInRange(0, 1)]
        elif kind == 1 and rec[name] is not None and name not in ("event_id", "source"):
            rec[name] = None if name in ("transaction_id", "region", "routing_policy") else ""
        else:
            rec[name] = fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 300))
    try:
        return CODEC.encode(rec)
    except ValueError:  # not encodable (e.g. a required field set to None)
        return b""


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        values = [fdp.ConsumeBytes(fdp.remaining_bytes())]
    elif mode == 1:
        values = [HEADER + fdp.ConsumeBytes(fdp.remaining_bytes())]
    else:
        values = [_mutated(fdp) for _ in range(fdp.ConsumeIntInRange(1, 3))]
    batch = [RawMessage("usage-events", 0, i, NOW, None, v) for i, v in enumerate(values)]
    result = IngestStage(CODEC, Rules(), KEY, DedupIndex()).process(batch)
    check_outcomes(batch, result, phone_elsewhere=True)


def main() -> None:
    seeds = Path("/tmp/tokenmeter-atheris-seeds")
    seeds.mkdir(exist_ok=True)
    for i in range(5):  # valid events, in every mode
        body = CODEC.encode(hostile.valid_record(i, NOW))
        (seeds / f"raw-{i}").write_bytes(b"\x00" + body)
        (seeds / f"body-{i}").write_bytes(b"\x01" + body[len(HEADER) :])
    args = (
        sys.argv
        if len(sys.argv) > 1 and not sys.argv[-1].startswith("-")
        else [
            *sys.argv,
            str(seeds),
        ]
    )
    atheris.Setup(args, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
