"""The linter's configuration (pyproject.toml, [tool.ruff]) holds for the whole code base."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_finds_nothing():
    ruff = Path(sys.executable).with_name("ruff")
    checked = subprocess.run(
        [str(ruff), "check", "--no-cache", "outbox_pipeline", "outbox_pipeline_tests", "docs"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert checked.returncode == 0, checked.stdout[-4000:] + checked.stderr[-2000:]
