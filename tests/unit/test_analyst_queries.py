"""docs/analysts.md: every ```sql block runs, read-only, on the shipped schema.

The warehouse is filled by the real stages (ingest -> rate -> window, see
``warehouse_fill``) with simulated traffic that has late events, dead letters, cached
tokens, cross-carrier calls and tenants on plans, and then re-rated once (so rollups
hold ``kind = 'rerate'`` rows and ``rerate_runs`` has a run). Each query must return
the columns its section documents, at least one row, money as Decimal, and no bare
``DateTime`` column (chdb's Arrow output turns those into integers).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pyarrow as pa
import pytest

from jobs.rerate import rerate
from pipeline.metering.plans import load_plans
from pipeline.metering.pricing import load_cards
from pipeline.warehouse import Warehouse
from tests.unit.warehouse_fill import CARDS, NOW_MS, PLANS, fill, sums

DOC = Path(__file__).resolve().parents[2] / "docs" / "analysts.md"
_SECTION = re.compile(r"^## (\d+)\. (.+)$", re.M)
_COLUMNS = re.compile(r"^Columns: (.+)$", re.M)
_SQL = re.compile(r"```sql\n(.*?)```", re.S)
_MONEY = re.compile(r"(amount|cny|revenue|discount|paid|saved)")


def _questions() -> list[tuple[str, list[str], str]]:
    """(title, documented columns, sql) per numbered section with a ```sql block."""
    text = DOC.read_text()
    heads = list(_SECTION.finditer(text))
    out = []
    for i, head in enumerate(heads):
        body = text[head.end() : heads[i + 1].start() if i + 1 < len(heads) else len(text)]
        blocks = _SQL.findall(body)
        if not blocks:
            continue
        cols = _COLUMNS.search(body)
        assert cols is not None, f"section {head.group(1)} lists no Columns:"
        names = [c.strip().strip("`") for c in cols.group(1).split(",")]
        assert len(blocks) == 1, f"section {head.group(1)}: one query per question"
        out.append((f"{head.group(1)}. {head.group(2)}", names, blocks[0]))
    return out


QUESTIONS = _questions()


def test_the_page_has_ten_questions_or_more() -> None:
    assert len(QUESTIONS) >= 10
    every_sql_block = _SQL.findall(DOC.read_text())
    assert len(every_sql_block) == len(QUESTIONS), "every sql block belongs to a question"


@pytest.fixture(scope="module")
def analyst_warehouse(warehouse: Warehouse, tmp_path_factory: pytest.TempPathFactory) -> Warehouse:
    """The shared warehouse, emptied, filled once for this module and re-rated once."""
    tables = warehouse.query_arrow(
        "SELECT name FROM system.tables WHERE database = currentDatabase() "
        "AND engine LIKE '%MergeTree' AND name != 'schema_migrations'"
    )
    for name in tables.column("name").to_pylist():
        warehouse.execute(f"TRUNCATE TABLE `{name}`")
    filled = fill(warehouse, events=4000, seed=3, tenants=30)
    assert filled.late > 0 and filled.dead_letters > 0
    # a price fix: deepseek-v3 input on the 2026.11 card
    fixed = tmp_path_factory.mktemp("cards")
    for card in CARDS.glob("*.yaml"):
        shutil.copy(card, fixed / card.name)
    path = fixed / "2026-11.yaml"
    text = path.read_text()
    changed = text.replace(
        "deepseek-v3,   prices: {input: 2.00,", "deepseek-v3,   prices: {input: 2.10,"
    )
    assert changed != text
    path.write_text(changed)
    report = rerate(warehouse, load_cards(fixed), load_plans(PLANS), NOW_MS - 3 * 3_600_000, NOW_MS)
    assert report.changed > 0
    assert sums(warehouse, "usage_day") == sums(warehouse, "rated_usage")
    return warehouse


@pytest.mark.parametrize("title,columns,sql", QUESTIONS, ids=[q[0][:40] for q in QUESTIONS])
def test_query_runs_and_returns_its_columns(
    analyst_warehouse: Warehouse, title: str, columns: list[str], sql: str
) -> None:
    result = analyst_warehouse.query_readonly(sql)
    assert result.column_names == columns, title
    assert result.num_rows >= 1, f"{title}: no rows"
    for field in result.schema:
        if _MONEY.search(field.name):
            assert pa.types.is_decimal(field.type), f"{title}: {field.name} is {field.type}"
    described = analyst_warehouse.query_arrow(f"DESCRIBE ({sql})")
    for name, ch_type in zip(
        described.column("name").to_pylist(), described.column("type").to_pylist(), strict=True
    ):
        assert not re.match(r"^(Nullable\()?DateTime(\(|$)", ch_type), (
            f"{title}: {name} is {ch_type}; return a Date or DateTime64 instead"
        )


def test_money_columns_hold_exact_totals(analyst_warehouse: Warehouse) -> None:
    """Question 1's amounts add up to rated_usage's (home carrier's reports)."""
    sql = dict((t.split(".")[0], s) for t, _, s in QUESTIONS)["1"]
    rows = analyst_warehouse.query_readonly(sql).to_pylist()
    total = sum(r["amount_cny"] for r in rows)
    expected = analyst_warehouse.query_arrow(
        "SELECT sum(amount) AS a FROM rated_usage WHERE reporting_carrier = home_carrier"
    ).to_pylist()[0]["a"]
    assert total == expected
