"""Dead-letter replay: an `unpriced` event is accepted after a price card fix, once."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from pipeline.settings import REPO_ROOT
from tests.integration.harness import Harness

pytestmark = pytest.mark.integration


def _event(event_id: str, model: str, input_tokens: int = 100) -> dict:
    return {
        "event_id": event_id, "event_time": int(time.time() * 1000), "source": "gateway",
        "source_id": "gw-sh-01", "reporting_carrier": "CTCC", "home_carrier": "CTCC",
        "serving_carrier": "CTCC", "tenant_id": "tn-replay", "subscriber_id": "13900139000",
        "channel": "api", "model_id": model, "provider": "Example", "input_tokens": input_tokens,
        "output_tokens": 10, "cached_tokens": 0, "reasoning_tokens": 0, "status": "ok",
    }  # fmt: skip


def test_unpriced_event_is_accepted_once_after_the_card_is_fixed(
    harness: Harness, tmp_path: Path
) -> None:
    cards = tmp_path / "cards"
    shutil.copytree(REPO_ROOT / "config" / "price_cards", cards)
    harness.env["TOKENMETER_PRICE_CARDS"] = str(cards)
    harness.start_worker()

    events = tmp_path / "events.jsonl"
    events.write_text(
        "\n".join(json.dumps(e) for e in [_event("r-1", "qwen-max"), _event("r-2", "new-model")])
    )
    harness.cli("produce", "--file", str(events))
    harness.cli("wait", "--idle", "1", "--timeout", "120")
    assert harness.scalar("SELECT count() FROM usage_events") == 1
    letter = harness.sql("SELECT reason, stage, event_id FROM dead_letters")
    assert letter == [{"reason": "unpriced", "stage": "rate", "event_id": "r-2"}]

    # the fix: the model gets a price line and a Token Unit factor in every card version
    for card in cards.glob("*.yaml"):
        text = card.read_text()
        text = text.replace(
            "models:\n", "models:\n  new-model:     {token_unit_factor: 1.0}\n", 1
        ).replace(
            "lines:\n",
            'lines:\n  - {serving_carrier: "*", model_id: new-model, '
            "prices: {input: 1.00, output: 2.00}}\n",
            1,
        )
        card.write_text(text)
    assert harness.stop_worker() == 0
    harness.start_worker()

    for _ in range(2):  # replaying twice counts the event once
        out = harness.cli("dlq", "replay", "--reason", "unpriced").stdout
        assert "re-sent" in out
        harness.cli("wait", "--idle", "1", "--timeout", "120")
    rows = harness.sql(
        "SELECT event_id, toString(amount) AS amount FROM rated_usage ORDER BY event_id"
    )
    # new-model: 100 input x 1.00 + 10 output x 2.00 CNY per million tokens
    assert rows == [
        {"event_id": "r-1", "amount": rows[0]["amount"]},
        {"event_id": "r-2", "amount": "0.00012"},
    ]

    # letters that are still wrong stay where they are and are reported
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(_event("r-3", "qwen-max", input_tokens=-1)) + "\n")
    harness.cli("produce", "--file", str(bad), check=False)
    harness.cli("wait", "--idle", "1", "--timeout", "120")
    out = harness.cli("dlq", "replay", "--reason", "negative_tokens").stdout
    assert "still invalid (negative_tokens)" in out
    listing = harness.cli("dlq", "list").stdout
    assert "negative_tokens" in listing and "unpriced" in listing
