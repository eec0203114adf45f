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


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_data_dir_is_created_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    import os

    previous = os.umask(0o022)  # a usual login umask: mkdir would give 0755
    try:
        settings = load_settings(data_dir=tmp_path / "new" / "data")
        assert settings.private_data_dir() == ""  # nothing was loose: nothing to say
        settings.pseudonym_secret()
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "new") == 0o700
    assert _mode(tmp_path / "new" / "data") == 0o700
    assert _mode(tmp_path / "new" / "data" / "secrets") == 0o700
    assert _mode(tmp_path / "new" / "data" / "secrets" / "pseudonym.key") == 0o600


def test_a_loose_data_dir_is_tightened_once(tmp_path: Path) -> None:
    import os

    data = tmp_path / "data"
    previous = os.umask(0o022)  # as an older version left it (mkdir: 0755)
    try:
        (data / "warehouse" / "store").mkdir(parents=True)
        (data / "kafka" / "logs").mkdir(parents=True)
    finally:
        os.umask(previous)
    part = data / "warehouse" / "store" / "data.bin"
    part.write_bytes(b"events")
    script = data / "kafka" / "run.sh"
    script.write_text("#!/bin/sh\n")
    mine = data / "not-ours.txt"  # the project did not write it: left as it is
    mine.write_text("x")
    for path in (data, data / "warehouse", data / "warehouse" / "store", data / "kafka"):
        path.chmod(0o755)
    part.chmod(0o644)
    script.chmod(0o755)
    mine.chmod(0o644)
    settings = load_settings(data_dir=data)
    message = settings.private_data_dir()
    assert "group or others could read 7 of the files and directories" in message
    assert str(data) in message
    assert [_mode(p) for p in (data, data / "warehouse", data / "kafka", part)] == [
        0o700,
        0o700,
        0o700,
        0o600,
    ]
    assert _mode(script) == 0o700  # owner's bits kept, executable stays executable
    assert _mode(mine) == 0o644  # unreadable anyway: its directory is 0700
    assert settings.private_data_dir() == ""  # said once


def test_the_spool_and_the_quota_journal_are_owner_only_under_a_usual_umask(
    tmp_path: Path,
) -> None:
    """The producer spool holds raw events and runs in the producer's process, whatever
    its umask; the journal is rewritten at every start."""
    import os

    from pipeline.quota.journal import Journal
    from pipeline.spool import Spool

    previous = os.umask(0o022)
    try:
        segment = Spool(tmp_path / "data" / "spool").append([(b"tn-1", b"raw event")])
        journal = Journal(tmp_path / "data" / "quota" / "reservations.jsonl")
        journal.replay(now_ms=0)
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "data" / "spool") == 0o700
    assert _mode(segment) == 0o600
    assert _mode(tmp_path / "data" / "quota") == 0o700
    assert _mode(journal.path) == 0o600
