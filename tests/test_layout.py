"""The layering of pipeline/ as pyproject.toml's import contract states it
(import-linter): each room imports only the rooms below it, and the pure
rooms never touch a socket, the run directory or a data file."""
from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parent.parent


def test_the_import_contract_holds(monkeypatch, capsys):
    from importlinter.cli import lint_imports
    monkeypatch.chdir(ROOT)
    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "0 broken" in out and "6 kept" in out
