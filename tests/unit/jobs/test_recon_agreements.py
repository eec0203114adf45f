"""jobs.agreements: the shipped agreement files and the checks on bad ones."""

from __future__ import annotations

import shutil
from decimal import Decimal
from pathlib import Path

import pytest

from jobs.agreements import (
    DEFAULT_AGREEMENTS_DIR,
    REVENUE_SHARE_FILE,
    WHOLESALE_FILE,
    AgreementError,
    load_agreements,
)

D = Decimal


def test_shipped_agreements_load() -> None:
    ag = load_agreements(DEFAULT_AGREEMENTS_DIR)
    assert ag.wholesale.default_rate_percent == D("70")
    assert ag.wholesale.rate("CMCC", "CUCC", "jiutian-13b") == D("80")
    assert ag.wholesale.rate("CTCC", "CMCC", "deepseek-r1") == D("75")
    assert ag.wholesale.rate("CTCC", "CUCC", "qwen-max") == D("65")
    assert ag.wholesale.rate("CUCC", "CMCC", "qwen-max") == D("70")
    split = ag.revenue_share.split("DeepSeek", "api", "CMCC")
    assert split.items() == [
        ("serving_carrier", D("35")),
        ("model_provider", D("62.5")),
        ("channel", D("2.5")),
    ]
    assert ag.revenue_share.split("China Mobile", "api", "CMCC").model_provider == D("35")
    assert ag.revenue_share.split("Zhipu", "app", "CTCC") == ag.revenue_share.default
    assert len(ag.sha256) == 64


def _copy(tmp_path: Path) -> Path:
    target = tmp_path / "agreements"
    shutil.copytree(DEFAULT_AGREEMENTS_DIR, target)
    return target


def test_the_hash_follows_the_bytes(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    before = load_agreements(d).sha256
    path = d / WHOLESALE_FILE
    path.write_text(path.read_text() + "\n# a comment\n")
    assert load_agreements(d).sha256 != before


def test_numbers_are_exact_decimals(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    (d / WHOLESALE_FILE).write_text('version: "x"\ndefault_rate_percent: 70.1\n')
    assert load_agreements(d).wholesale.default_rate_percent == D("70.1")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    (d / WHOLESALE_FILE).write_text(
        'version: "x"\ndefault_rate_percent: 170\nrules:\n'
        "  - {serving_carrier: CBN, rate_percent: 10}\n"
        "extra: 1\n"
    )
    (d / REVENUE_SHARE_FILE).write_text(
        'version: "x"\ndefault: {serving_carrier: 30, model_provider: 60, channel: 20}\n'
    )
    with pytest.raises(AgreementError) as info:
        load_agreements(d)
    text = "\n".join(info.value.errors)
    assert "wholesale.yaml: default_rate_percent" in text
    assert "wholesale.yaml: rules[0].serving_carrier" in text
    assert "wholesale.yaml: extra" in text
    assert "revenue_share.yaml: default: shares must add up to 100, not 110" in text


def test_duplicate_keys_and_missing_files(tmp_path: Path) -> None:
    d = _copy(tmp_path)
    (d / WHOLESALE_FILE).write_text('version: "x"\ndefault_rate_percent: 70\nversion: "y"\n')
    with pytest.raises(AgreementError, match="duplicate key"):
        load_agreements(d)
    (d / WHOLESALE_FILE).unlink()
    with pytest.raises(AgreementError, match="wholesale.yaml: cannot read"):
        load_agreements(d)
