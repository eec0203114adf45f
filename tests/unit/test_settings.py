"""Settings: bad values are named by their variable, secrets never show."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from pipeline.settings import SettingsError, load_settings


def test_bad_value_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMETER_WEB_PORT", "99999")
    with pytest.raises(SettingsError) as err:
        load_settings()
    assert str(err.value).startswith("TOKENMETER_WEB_PORT:")


def test_warehouse_password_stays_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMETER_WAREHOUSE_URL", "clickhouse://ana:s3cret-pw@db:8123/x")
    settings = load_settings()
    assert "s3cret-pw" not in repr(settings) and "s3cret-pw" not in str(settings)
    assert settings.warehouse_url.get_secret_value().endswith("@db:8123/x")


def test_generated_pseudonym_key_is_private_and_stable(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    key = settings.pseudonym_secret()
    path = tmp_path / "secrets" / "pseudonym.key"
    assert len(key) == 64 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_settings(data_dir=tmp_path).pseudonym_secret() == key


def test_short_pseudonym_key_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMETER_PSEUDONYM_KEY", "short")
    with pytest.raises(SettingsError, match="TOKENMETER_PSEUDONYM_KEY"):
        load_settings().pseudonym_secret()


def test_confluent_wire_format_needs_a_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKENMETER_WIRE_FORMAT", "confluent")
    with pytest.raises(SettingsError, match="SCHEMA_REGISTRY_URL"):
        load_settings()
