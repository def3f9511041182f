"""pipeline.runner.run_stage (one stage outside a build, for benchmarks) and pipeline.config.config_with."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import config_with, load_config
from pipeline.errors import ConfigError
from pipeline.progress import ProgressDisplay
from pipeline.runner import Build, run_stage

QUIET = ProgressDisplay(enabled=False)


def test_run_stage_gives_the_bytes_a_build_gives(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    stages = {s["stage"]: s for s in Build(cfg).run(QUIET, until="distill")}
    metrics = run_stage(cfg, "distill", tmp_path / "manual", {"adapt": Path(stages["adapt"]["dir"])}, QUIET)
    built = Path(stages["distill"]["dir"])
    assert (tmp_path / "manual" / "student.pt").read_bytes() == (built / "student.pt").read_bytes()
    assert metrics["student_test_acc"] == stages["distill"]["metrics"]["student_test_acc"]


def test_run_stage_names_a_missing_input(tiny_config, tmp_path):
    with pytest.raises(ConfigError, match="Stage 'distill' reads adapt, which were not given"):
        run_stage(load_config(tiny_config), "distill", tmp_path / "out", {})


def test_config_with_overrides_and_removes(tiny_config):
    cfg = config_with(tiny_config, {"distill.method": "fitnet", "qat.epochs": 2, "data.labels_per_class": 8},
                      remove=("export",))
    assert (cfg.distill.method, cfg.qat.epochs, cfg.data.labels_per_class, cfg.export) == ("fitnet", 2, 8, None)
    with pytest.raises(ConfigError, match="distill.epochs"):
        config_with(tiny_config, {"distill.epochs": 0})
