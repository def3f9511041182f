"""The tiny end-to-end build through the CLI: build, reuse, status, --force, --until."""

from __future__ import annotations

import json

import pytest

from .conftest import run_cli


@pytest.mark.slow
def test_tiny_build_runs_then_reuses_every_stage(tiny_config):
    first = run_cli("build", tiny_config)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "teacher subtask accuracy" in first.stdout and "student subtask accuracy" in first.stdout
    build_dir = tiny_config.parent / "builds" / "tiny"
    distill = json.loads(next(build_dir.glob("distill-*/stage.json")).read_text())["metrics"]
    assert 0.0 <= distill["student_test_acc"] <= 1.0 and distill["test_images"] == 80
    assert (next(build_dir.glob("distill-*")) / "student.pt").stat().st_size > 0

    second = run_cli("build", tiny_config)
    assert second.returncode == 0
    assert "running" not in second.stdout and second.stdout.count("cached") >= 3

    status = run_cli("status", tiny_config)
    assert status.returncode == 0 and status.stdout.count("cached") >= 3

    forced = run_cli("build", tiny_config, "--force", "distill")
    assert "distill    running" in forced.stdout and "teacher    cached" in forced.stdout


def test_until_stops_after_the_named_stage(tiny_config):
    result = run_cli("build", tiny_config, "--until", "teacher")
    assert result.returncode == 0, result.stdout
    build_dir = tiny_config.parent / "builds" / "tiny"
    assert list(build_dir.glob("teacher-*")) and not list(build_dir.glob("adapt-*"))


def test_unknown_stage_name_lists_the_stages(tiny_config):
    result = run_cli("build", tiny_config, "--until", "distil")
    assert result.returncode == 2
    assert "Unknown stage 'distil'. Did you mean 'distill'?" in result.stdout
