"""Running a load test as its smoke test does: the module as a command, `--quick --json`, one
JSON object on stdout, within a bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def run_quick(module: str, out: Path, *args: str, timeout: float = 55.0) -> dict[str, Any]:
    """`python -m MODULE --quick --json ARGS --out OUT`: its exit status 0 and its one JSON
    object, or the test fails with the tail of its stderr."""
    cmd = [sys.executable, "-m", module, "--quick", "--json", *args, "--out", str(out)]
    try:
        run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{module} took over {timeout:g} s; stderr tail:\n"
                    f"{(exc.stderr or '')[-3000:]}")
    assert run.returncode == 0, f"exit {run.returncode}; stderr tail:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout)  # exactly one JSON object on stdout
