"""python -m bench label_suggestions --quick: random vs suggested labels through the real stages, on tiny data."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest

from .conftest import REPO


@pytest.mark.slow
def test_quick_label_suggestions_run_writes_every_row(tmp_path):
    out = tmp_path / "ls.json"
    result = subprocess.run([sys.executable, "-m", "bench", "label_suggestions", "--quick", "--output",
                             str(tmp_path / "b"), "--out", str(out), "--threads", "1"], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    runs = {r["row"]: r for r in report["runs"]}
    assert set(runs) == {"random", "suggested", "suggested, subtask", "every label"}
    # the reference: every training label of the subtask (tiny: 4 classes x 40 train + val images per class)
    assert runs["every label"]["labels"] > runs["random"]["labels"] and 0.0 <= runs["every label"]["test_acc"] <= 1.0
    summary = {(r["row"], r["n"]): r for r in report["summary"]}
    assert summary[("random", 8)]["gap_to_every_label"] == pytest.approx(
        runs["every label"]["test_acc"] - runs["random"]["test_acc"])
    assert runs["random"]["labels"] == 4 * 8 and 0.0 <= runs["random"]["test_acc"] <= 1.0
    # the annotator labels only the subtask's images among the K = 32 suggestions
    assert runs["suggested, subtask"]["labels"] == 32 and runs["suggested, subtask"]["looked_at"] == 32
    suggested = runs["suggested"]
    assert suggested["looked_at"] == 32 and ("error" in suggested or suggested["labels"] < 32)
    labels_files = sorted((tmp_path / "b" / "labels").glob("*.csv"))
    assert [p.name.rsplit("_", 1)[1] for p in labels_files] == ["all.csv", "subtask.csv"]
    assert out.with_suffix(".png").stat().st_size > 1000 and "suggested" in out.with_suffix(".txt").read_text()
    assert out.with_suffix(".txt").read_text().startswith("# commit ")
    # --keep-runs takes the file's runs instead of building them again, and refuses those of another recipe: the
    # recipe's digest is that of the config the runs were built from (here the tiny one).
    assert report["args"]["recipe_sha256"] == hashlib.sha256((REPO / "configs" / "tiny.yaml").read_bytes()).hexdigest()
    again = subprocess.run([sys.executable, "-m", "bench", "label_suggestions", "--quick", "--output",
                            str(tmp_path / "b"), "--out", str(out), "--threads", "1", "--rows", "random",
                            "--keep-runs"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("(kept)") == 2          # the reference and the random row
    kept = json.loads(out.read_text())
    assert [r["test_acc"] for r in kept["runs"]] == [runs["every label"]["test_acc"], runs["random"]["test_acc"]]
    assert kept["kept_from"][-1]["utc"] == report["provenance"]["utc"]

    def keep_with(override: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "bench", "label_suggestions", "--quick", "--output",
                               str(tmp_path / "b"), "--out", str(out), "--threads", "1", "--rows", "random",
                               "--keep-runs", "--set", override], cwd=REPO, capture_output=True, text=True, timeout=600)

    other = keep_with("distill.epochs=3")          # tiny.yaml distills for 2 epochs
    assert other.returncode != 0 and "another recipe" in other.stderr and "Traceback" not in other.stderr
    assert json.loads(out.read_text()) == kept
    # the recipe is compared as parsed: setting a key to the file's own value is the same recipe
    same = keep_with("distill.epochs=2")
    assert same.returncode == 0 and same.stdout.count("(kept)") == 2, same.stdout + same.stderr
