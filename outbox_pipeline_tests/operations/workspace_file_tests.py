"""The commands that the docs run with `-w workspace.yaml` accept that option."""

import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_commands_named_with_the_workspace_file_take_it():
    documents = [REPO_ROOT / "workspace.yaml", REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
    text = "".join(document.read_text() for document in documents)
    commands = set(re.findall(r"dagster ((?:[a-z]+ )?[a-z]+) -w workspace\.yaml", text))
    assert commands
    for command in sorted(commands):
        result = subprocess.run(
            [str(Path(sys.executable).parent / "dagster"), *command.split(), "--help"], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "--workspace" in result.stdout, f"`dagster {command}` has no -w/--workspace option"
