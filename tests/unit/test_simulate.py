"""pipeline.simulate: synthetic traffic whose ground truth is exact.

The truth is built from construction; these tests re-derive it from the bytes the
simulation emits, with the real decoder and validator (``AvroCodec.decode``,
``check_record``), so the two can only agree if both are right.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import pytest

from pipeline.events import (
    TOKEN_FIELDS,
    Reason,
    Rules,
    check_record,
    dedup_key,
    payload_hash,
)
from pipeline.serde import V1_LAYOUT, AvroCodec, DecodeError, writer_layout
from pipeline.simulate import (
    BAD_REASONS,
    FAILED_STATUSES,
    KIND_BAD,
    KIND_DUPLICATE,
    KIND_VALID,
    MODELS,
    WINDOW_MS,
    SimMessage,
    Simulation,
    Truth,
    write_truth,
)

NOW = 1_780_000_000_000  # 2026-05-28T20:26:40Z
SEED = 20261128
N = 6000
DUP, BAD = 0.1, 0.2

CODEC = AvroCodec()
RULES = Rules()


@pytest.fixture(scope="module")
def run() -> tuple[Simulation, list[SimMessage]]:
    sim = Simulation(SEED, NOW, codec=CODEC)
    return sim, list(sim.messages(N, dup_rate=DUP, bad_rate=BAD))


def _decoded_valid(messages: list[SimMessage]) -> list[dict[str, Any]]:
    return [CODEC.decode(m.value) for m in messages if m.kind == KIND_VALID]


# ---- determinism and counts ----------------------------------------------------------


def test_same_seed_same_bytes(run: tuple[Simulation, list[SimMessage]]) -> None:
    sim, messages = run
    again = Simulation(SEED, NOW)  # its own codec: same bytes
    other = list(again.messages(N, dup_rate=DUP, bad_rate=BAD))
    assert [(m.key, m.value, m.kind, m.reason) for m in other] == [
        (m.key, m.value, m.kind, m.reason) for m in messages
    ]
    assert again.truth.to_json() == sim.truth.to_json()


def test_other_seed_or_now_other_stream() -> None:
    a = [m.value for m in Simulation(1, NOW).messages(50)]
    b = [m.value for m in Simulation(2, NOW).messages(50)]
    assert a != b
    # same seed at another now: same shape of traffic, but no event_id in common, so a
    # second run against the same warehouse is not swallowed by deduplication
    ids_a = {CODEC.decode(v)["event_id"] for v in a}
    ids_c = {m.record["event_id"] for m in Simulation(1, NOW + 1).messages(50) if m.record}
    assert not ids_a & ids_c


def test_exact_counts(run: tuple[Simulation, list[SimMessage]]) -> None:
    sim, messages = run
    kinds = Counter(m.kind for m in messages)
    assert len(messages) == N
    assert kinds == {KIND_VALID: N - 600 - 1200, KIND_DUPLICATE: 600, KIND_BAD: 1200}
    reasons = Counter(m.reason for m in messages if m.kind == KIND_BAD)
    assert reasons == {r.value: 120 for r in BAD_REASONS}
    assert all(m.reason is None for m in messages if m.kind != KIND_BAD)
    # spread through the stream, not bunched at one end
    for kind in (KIND_DUPLICATE, KIND_BAD):
        positions = [i for i, m in enumerate(messages) if m.kind == kind]
        assert positions[0] < N // 10 and positions[-1] > N - N // 10


def test_rounding_and_uneven_reasons() -> None:
    # round() is Python's: 2.5 -> 2, 1.5 -> 2; 13 bad over 10 reasons: 1 each + 3 more
    messages = list(Simulation(3, NOW).messages(5, dup_rate=0.5, bad_rate=0.3))
    assert Counter(m.kind for m in messages) == {KIND_DUPLICATE: 2, KIND_BAD: 2, KIND_VALID: 1}
    assert messages[0].kind == KIND_VALID  # duplicates need something to copy
    bad = [m.reason for m in Simulation(4, NOW).messages(100, bad_rate=0.13) if m.reason]
    counts = Counter(bad)
    assert len(bad) == 13 and set(counts) == {r.value for r in BAD_REASONS}
    assert sorted(counts.values()) == [1] * 7 + [2] * 3


def test_argument_errors() -> None:
    sim = Simulation(5, NOW)
    with pytest.raises(ValueError, match="exceed"):
        sim.messages(10, dup_rate=0.6, bad_rate=0.6)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sim.messages(10, dup_rate=-0.1)
    with pytest.raises(ValueError, match="negative"):
        sim.messages(-1)
    with pytest.raises(ValueError, match="valid message to copy"):
        sim.messages(10, dup_rate=1.0)
    assert list(sim.messages(0)) == []
    assert sim.truth.messages == 0
    with pytest.raises(ValueError):
        Simulation(5, NOW, tenants=0)


# ---- every message is what it claims to be -----------------------------------------


def test_valid_and_duplicates_pass(run: tuple[Simulation, list[SimMessage]]) -> None:
    sim, messages = run
    for m in messages:
        if m.kind == KIND_BAD:
            continue
        rec = CODEC.decode(m.value)
        assert rec == m.record
        assert check_record(rec, sim.now_ms, RULES) is None, rec
        assert m.key == rec["tenant_id"].encode()
        assert sim.now_ms - WINDOW_MS <= rec["event_time"] <= sim.now_ms - 1000


def test_bad_messages_fail_with_their_reason(run: tuple[Simulation, list[SimMessage]]) -> None:
    sim, messages = run
    seen_valid: dict[str, tuple[bytes, int]] = {}  # dedup key -> (message key, payload)
    variants: dict[str, set[str]] = defaultdict(set)
    for m in messages:
        assert isinstance(m.key, bytes) and m.key
        if m.kind == KIND_VALID:
            rec = CODEC.decode(m.value)
            seen_valid.setdefault(dedup_key(rec), (m.key, payload_hash(rec)))
            continue
        if m.kind != KIND_BAD:
            continue
        assert m.reason is not None
        if m.reason in (Reason.UNDECODABLE, Reason.UNKNOWN_SCHEMA):
            assert m.record is None
            with pytest.raises(DecodeError) as caught:
                CODEC.decode(m.value)
            assert caught.value.reason == m.reason
            variants[m.reason].add(
                "truncated" if m.value[:2] == b"\xc3\x01" else m.value[:1].decode("latin-1")
            )
            continue
        rec = CODEC.decode(m.value)  # encodable and decodable
        assert rec == m.record
        rejection = check_record(rec, sim.now_ms, RULES)
        if m.reason == Reason.CONFLICTING_DUPLICATE:
            assert rejection is None
            # an earlier valid event with the same dedup key, in the same partition,
            # with a different payload
            original_key, original_hash = seen_valid[dedup_key(rec)]
            assert original_key == m.key
            assert original_hash != payload_hash(rec)
        else:
            assert rejection is not None, (m.reason, rec)
            assert rejection.reason == m.reason, (rejection, rec)
            assert dedup_key(rec) not in seen_valid  # never collides with a valid event
            if rec["tenant_id"]:
                assert m.key == rec["tenant_id"].encode()
            variants[m.reason].add(rejection.detail.split(":")[0])
    # the recipes vary: several shapes of undecodable bytes and of each kind of wrong field
    assert len(variants[Reason.UNDECODABLE]) >= 3
    assert {"reporting_carrier", "status", "home_carrier"} <= variants[Reason.UNKNOWN_ENUM]
    assert set(TOKEN_FIELDS) <= variants[Reason.NEGATIVE_TOKENS]
    assert {"tenant_id", "event_id", "subscriber_id", "latency_ms"} <= variants[
        Reason.INVALID_VALUE
    ]


def test_every_truncation_is_undecodable(run: tuple[Simulation, list[SimMessage]]) -> None:
    _, messages = run
    samples = [m.value for m in messages if m.kind == KIND_VALID][:20]
    for value in samples:
        for cut in range(len(value)):
            with pytest.raises(DecodeError) as caught:
                CODEC.decode(value[:cut])
            assert caught.value.reason == Reason.UNDECODABLE


def test_duplicates_copy_an_earlier_valid_message(
    run: tuple[Simulation, list[SimMessage]],
) -> None:
    _, messages = run
    seen: set[tuple[bytes, bytes]] = set()
    for m in messages:
        if m.kind == KIND_VALID:
            seen.add((m.key, m.value))
        elif m.kind == KIND_DUPLICATE:
            assert (m.key, m.value) in seen


def test_valid_events_are_unique(run: tuple[Simulation, list[SimMessage]]) -> None:
    _, messages = run
    valid = _decoded_valid(messages)
    assert len({dedup_key(r) for r in valid}) == len(valid)
    assert len({r["event_id"] for r in valid}) == len(valid)
    assert len({m.value for m in messages if m.kind == KIND_VALID}) == len(valid)


def test_fast_encoder_is_byte_identical(run: tuple[Simulation, list[SimMessage]]) -> None:
    sim, messages = run
    assert sim._encode is not CODEC.encode  # the fast path is in use for v1
    assert writer_layout(CODEC) == V1_LAYOUT  # the layout the fast encoder is written for
    for m in messages:
        if m.record is not None and m.kind != KIND_DUPLICATE:
            assert CODEC.encode(m.record) == m.value


def test_unknown_writer_schema_falls_back_to_the_codec() -> None:
    v1 = CODEC.schema("v1")
    v2 = dict(
        v1, fields=[*v1["fields"], {"name": "extra", "type": ["null", "string"], "default": None}]
    )
    codec = AvroCodec(extra_schemas={"v2": v2})
    assert codec.write_version == "v2"
    sim = Simulation(6, NOW, codec=codec)
    assert sim._encode == codec.encode
    messages = list(sim.messages(200, dup_rate=0.1, bad_rate=0.1))
    for m in messages:
        if m.kind == KIND_VALID:
            assert m.value[2:10] == codec.fingerprint
            rec = codec.decode(m.value)
            assert rec["extra"] is None and rec["event_id"] == m.record["event_id"]


# ---- the truth -------------------------------------------------------------------------


def _recount(messages: list[SimMessage]) -> dict[str, Any]:
    """The truth, re-derived from the emitted bytes with the real decoder."""
    valid = _decoded_valid(messages)

    def sums(records: list[dict[str, Any]]) -> dict[str, int]:
        out = {"events": len(records)}
        for name in TOKEN_FIELDS:
            out[name] = sum(r[name] for r in records)
        return out

    def by(field: str) -> dict[str, dict[str, int]]:
        groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in valid:
            groups[r[field]].append(r)
        return {k: sums(v) for k, v in sorted(groups.items())}

    transactions = {r["transaction_id"] for r in valid if r["transaction_id"]}
    dead = Counter(m.reason for m in messages if m.kind == KIND_BAD)
    return {
        "messages": len(messages),
        "unique_valid": len(valid),
        "exact_duplicates": sum(m.kind == KIND_DUPLICATE for m in messages),
        "dead_letters": dict(sorted(dead.items())),
        "dead_letters_total": sum(dead.values()),
        "tokens": {k: v for k, v in sums(valid).items() if k != "events"},
        "by_reporting_carrier": by("reporting_carrier"),
        "by_model": by("model_id"),
        "by_tenant": by("tenant_id"),
        "by_status": {k: v["events"] for k, v in by("status").items()},
        "by_channel": {k: v["events"] for k, v in by("channel").items()},
        "cross_carrier_transactions": len(transactions),
    }


def test_truth_matches_the_stream(run: tuple[Simulation, list[SimMessage]]) -> None:
    sim, messages = run
    truth = sim.truth.to_json()
    assert truth.pop("seed") == SEED and truth.pop("now_ms") == NOW
    assert truth == _recount(messages)
    assert set(truth["by_reporting_carrier"]) == {"CMCC", "CTCC", "CUCC"}
    assert sim.truth.dead_letters_total == 1200


def test_truth_accumulates_over_calls() -> None:
    sim = Simulation(7, NOW)
    first = list(sim.messages(300, dup_rate=0.1, bad_rate=0.1))
    second = list(sim.messages(200, dup_rate=0.5))
    truth = sim.truth.to_json()
    del truth["seed"], truth["now_ms"]
    assert truth == _recount(first + second)
    ids = [r["event_id"] for r in _decoded_valid(first + second)]
    assert len(set(ids)) == len(ids)


def test_truth_json_is_ints_and_written_atomically(
    run: tuple[Simulation, list[SimMessage]], tmp_path: Path
) -> None:
    sim, _ = run

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert type(k) is str
                walk(v)
        else:
            assert type(value) is int, value

    walk(sim.truth.to_json())
    path = write_truth(sim.truth, tmp_path / "out" / "truth.json")
    assert json.loads(path.read_text()) == sim.truth.to_json()
    assert [p.name for p in path.parent.iterdir()] == ["truth.json"]
    assert set(sim.truth.to_json()) == {
        "seed",
        "now_ms",
        "messages",
        "unique_valid",
        "exact_duplicates",
        "dead_letters",
        "dead_letters_total",
        "tokens",
        "by_reporting_carrier",
        "by_model",
        "by_status",
        "by_channel",
        "by_tenant",
        "cross_carrier_transactions",
    }
    assert Truth(seed=1, now_ms=2).to_json()["tokens"] == dict.fromkeys(TOKEN_FIELDS, 0)


# ---- cross-carrier calls -------------------------------------------------------------


def test_cross_carrier_calls_are_reported_by_both(
    run: tuple[Simulation, list[SimMessage]],
) -> None:
    sim, messages = run
    by_tx: dict[str, list[tuple[int, dict[str, Any]]]] = defaultdict(list)
    same_carrier = 0
    for i, m in enumerate(messages):
        if m.kind != KIND_VALID:
            continue
        rec = CODEC.decode(m.value)
        if rec["home_carrier"] == rec["serving_carrier"]:
            assert rec["transaction_id"] is None
            assert rec["reporting_carrier"] == rec["home_carrier"]
            same_carrier += 1
        else:
            by_tx[rec["transaction_id"]].append((i, rec))
    assert len(by_tx) == sim.truth.cross_carrier_transactions
    calls = len(by_tx) + same_carrier
    assert 0.07 * calls < len(by_tx) < 0.13 * calls  # ~10 % of calls
    first_reporters = Counter()
    for pair in by_tx.values():
        assert len(pair) == 2
        (_, a), (_, b) = pair
        assert a["home_carrier"] == b["home_carrier"] != a["serving_carrier"]
        assert a["serving_carrier"] == b["serving_carrier"]
        assert {a["reporting_carrier"], b["reporting_carrier"]} == {
            a["home_carrier"],
            a["serving_carrier"],
        }
        assert a["event_id"] != b["event_id"]
        for name in (*TOKEN_FIELDS, "tenant_id", "event_time", "model_id", "status"):
            assert a[name] == b[name]
        first_reporters[a["reporting_carrier"] == a["home_carrier"]] += 1
    assert len(first_reporters) == 2  # sometimes home reports first, sometimes serving


# ---- realism -------------------------------------------------------------------------


def test_traffic_looks_like_carrier_traffic(run: tuple[Simulation, list[SimMessage]]) -> None:
    _, messages = run
    valid = _decoded_valid(messages)
    n = len(valid)
    tenants = Counter(r["tenant_id"] for r in valid)
    top = sum(c for _, c in tenants.most_common(20))
    assert top > 0.5 * n and len(tenants) > 100  # Zipf: a few tenants make most traffic
    for r in valid:
        assert r["tenant_id"][3:7].upper() == r["home_carrier"]
        sub = r["subscriber_id"]
        assert len(sub) == 11 and sub.isdigit() and sub[0] == "1"
    models = Counter(r["model_id"] for r in valid)
    assert set(models) == {m for m, *_ in MODELS}
    assert models.most_common(1)[0][0] == "deepseek-v3"
    providers = {m: p for m, p, _, _ in MODELS}
    reasoning = {m for m, _, _, r in MODELS if r}
    for r in valid:
        assert r["provider"] == providers[r["model_id"]]
        assert (r["reasoning_tokens"] > 0) == (
            r["model_id"] in reasoning and r["status"] not in FAILED_STATUSES
        )
        if r["status"] in FAILED_STATUSES:
            assert r["output_tokens"] == 0 and r["cached_tokens"] == 0
        else:
            assert 50 <= r["input_tokens"] <= 20_000 and 10 <= r["output_tokens"] <= 4000
        assert 0 <= r["cached_tokens"] <= r["input_tokens"]
        if r["source"] == "terminal":
            assert r["source_id"].startswith("stb-")
        else:
            assert r["source_id"].startswith(f"gw-{r['reporting_carrier'].lower()}-")
    statuses = Counter(r["status"] for r in valid)
    assert set(statuses) == {"ok", "timeout", "rate_limited", "error", "failover"}
    assert statuses["ok"] > 0.85 * n
    channels = Counter(r["channel"] for r in valid)
    assert len(channels) == 6 and channels.most_common(1)[0][0] == "app"
    assert set(Counter(r["source"] for r in valid)) == {"gateway", "terminal"}
    policies = Counter(r["routing_policy"] for r in valid)
    assert set(policies) == {"cost_first", "quality_first", "balanced", None}
    assert 0 < sum(r["cached_tokens"] > 0 for r in valid) < 0.5 * n
    assert 0 < sum(r["latency_ms"] is None for r in valid) < 0.1 * n
    assert 0 < sum(r["region"] is None for r in valid) < 0.1 * n
    assert 0 < sum(bool(r["attributes"]) for r in valid) < 0.3 * n
    inputs = sorted(r["input_tokens"] for r in valid if r["status"] == "ok")
    assert 300 < inputs[len(inputs) // 2] < 2000  # median: lognormal around ~800


# ---- speed -----------------------------------------------------------------------------


@pytest.mark.slow
def test_200k_messages_well_under_10_s() -> None:
    sim = Simulation(8, NOW)
    start = time.process_time()
    count = sum(1 for _ in sim.messages(200_000, dup_rate=0.05, bad_rate=0.05))
    elapsed = time.process_time() - start
    assert count == 200_000
    assert elapsed < 10, f"{elapsed:.1f} s CPU"
