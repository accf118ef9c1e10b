"""`capfilt demo/run` keep Prefect's INFO lines out of the way of the progress unless --verbose."""

from __future__ import annotations

import pytest

from flows.commands.run import _offline_env


@pytest.mark.parametrize(("verbose", "level"), [(False, "WARNING"), (True, None)])
def test_prefect_logs_warnings_only_unless_verbose(monkeypatch, verbose: bool, level: str | None) -> None:
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)
    _offline_env(verbose)
    import os

    assert os.environ.get("PREFECT_LOGGING_LEVEL") == level
    monkeypatch.delenv("PREFECT_LOGGING_LEVEL", raising=False)


def test_an_explicit_level_wins(monkeypatch) -> None:
    monkeypatch.setenv("PREFECT_LOGGING_LEVEL", "DEBUG")
    _offline_env(False)
    import os

    assert os.environ["PREFECT_LOGGING_LEVEL"] == "DEBUG"
