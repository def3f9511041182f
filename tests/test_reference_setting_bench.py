"""python -m bench reference_setting --quick: every method of the fixed comparison setting through the real stages."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_quick_reference_setting_builds_every_method_on_one_teacher(tmp_path):
    out = tmp_path / "ref.json"
    result = subprocess.run([sys.executable, "-m", "bench", "reference_setting", "--quick",
                             "--output", str(tmp_path / "b"),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert list(rows) == ["student_only", "kd", "subdistill", "fitnet", "attention", "vkd"]
    assert all(0.0 <= r["student_test_acc"] <= 1.0 and r["distill_wall_s"] > 0 for r in rows.values())
    # one teacher, trained once from scratch on the ten classes, read from the cache by every later method
    assert [r["teacher"]["cached"] for r in rows.values()] == [False] + [True] * 5
    assert len({r["teacher_test_acc"] for r in rows.values()}) == 1
    assert 1.12e6 < rows["kd"]["teacher_params"] < 1.14e6 and 60e3 < rows["kd"]["student_params"] < 62e3
    assert "subspaces_wall_s" in rows["subdistill"] and "subspaces_wall_s" not in rows["kd"]
    assert {"git_commit", "git_dirty", "cpu", "cores", "torch", "command", "utc"} <= set(report["provenance"])
