"""Stage keys, reuse, invalidation, atomic commits and the build lock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from pipeline.cache import BuildCache
from pipeline.config import load_config
from pipeline.errors import CacheBusyError
from pipeline.runner import Build

from .conftest import EDGESMITH, REPO, run_cli


def keys(path) -> dict[str, str]:
    return {p.stage.name: p.key for p in Build(load_config(path)).plan()}


def test_keys_are_stable_and_only_downstream_stages_change(write_config):
    base = keys(write_config("a.yaml"))
    assert base == keys(write_config("b.yaml"))
    changed = keys(write_config("c.yaml", **{"distill.epochs": 3}))
    assert changed["teacher"] == base["teacher"] and changed["adapt"] == base["adapt"]
    assert changed["distill"] != base["distill"]
    reseeded = keys(write_config("d.yaml", **{"build.seed": 1}))
    assert all(reseeded[name] != base[name] for name in base)


def test_where_the_cache_lives_and_how_hits_are_checked_change_no_key(write_config, tmp_path):
    base = keys(write_config("a.yaml"))
    assert keys(write_config("moved.yaml", **{"build.output": str(tmp_path / "elsewhere")})) == base
    assert keys(write_config("verified.yaml", **{"build.verify_cache": True})) == base
    # "auto" resolves to this machine's device: a config naming that device keys the same
    import torch

    here = "cuda" if torch.cuda.is_available() else "cpu"
    auto = keys(write_config("auto.yaml", **{"build.device": "auto"}))
    assert auto == keys(write_config("here.yaml", **{"build.device": here}))


@pytest.mark.slow
def test_a_moved_cache_folder_is_reused_whole(tmp_path):
    tiny = REPO / "configs" / "tiny.yaml"
    first, moved = tmp_path / "first", tmp_path / "moved"
    assert run_cli("build", tiny, "--set", f"build.output={first}").returncode == 0
    first.rename(moved)
    rows = Build(load_config(tiny, {"build.output": str(moved), "build.verify_cache": True})).status()
    assert [name for name, _, _ in rows] == ["teacher", "adapt", "distill", "qat", "export", "validate", "release"]
    assert all(cached for _, _, cached in rows), rows


def test_key_changes_with_package_versions(monkeypatch, write_config):
    import pipeline.runner as runner

    base = keys(write_config())
    real = runner.package_versions
    monkeypatch.setattr(runner, "package_versions", lambda names: {**real(names), "torch": "0.0-other"})
    assert all(k1 != k2 for k1, k2 in zip(base.values(), keys(write_config()).values()))


def test_a_runtime_or_explainer_upgrade_re_keys_validate(monkeypatch, write_config):
    """Each runtime the device suite can run, and zennit (validate.explain), enters the validate stage's key: a
    cached validation must not outlive what measured it. (zennit was missing once; the runtimes then entered only
    through the export stage's key.)"""
    import pipeline.runner as runner
    from device_tests.runners.base import RUNNERS

    with_validate = {"export.formats": ["onnx"], "validate.targets": ["local"]}
    base = keys(write_config(**with_validate))
    real = runner.package_versions
    distributions = {name: cls.distribution or name for name, cls in RUNNERS.items()} | {"explain": "zennit"}
    for what, distribution in distributions.items():
        monkeypatch.setattr(runner, "package_versions",
                            lambda names, d=distribution: {**real(names), **({d: "0.0-other"} if d in names else {})})
        changed = keys(write_config(**with_validate))
        assert changed["validate"] != base["validate"], f"upgrading {distribution} ({what}) leaves the validate key"
        assert changed["distill"] == base["distill"]


def test_failed_stage_leaves_nothing_that_would_be_reused(tmp_path):
    cache = BuildCache(tmp_path / "b")
    with pytest.raises(RuntimeError):
        with cache.staging("distill", "k" * 64) as tmp:
            (tmp / "student.pt").write_bytes(b"half")
            raise RuntimeError("killed midway")
    assert cache.lookup("distill", "k" * 64) is None
    assert not cache.path("distill", "k" * 64).exists()
    assert not any(cache.tmp_root.iterdir())


def test_a_build_killed_midway_is_not_reused(write_config, tmp_path):
    path = write_config(**{"distill.epochs": 400})
    proc = subprocess.Popen([*EDGESMITH, "build", str(path)], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    build_dir = tmp_path / "builds" / "tiny"
    deadline = time.time() + 120
    while time.time() < deadline and not list((build_dir / ".tmp").glob("distill-*")):
        time.sleep(0.2)
    time.sleep(1.0)  # well inside the 400 epochs
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((build_dir / ".tmp").glob("distill-*")), "the distill stage never started"
    assert not list(build_dir.glob("distill-*")), "a killed stage must not be committed"
    plan = Build(load_config(path)).status()
    assert dict((n, cached) for n, _, cached in plan)["distill"] is False


def test_second_build_waits_or_refuses_while_the_lock_is_held(tiny_config):
    cfg = load_config(tiny_config)
    cache = Build(cfg).cache
    with cache.lock():
        result = run_cli("build", tiny_config, "--no-wait")
        assert result.returncode == 2
        assert "Another build" in result.stdout and "is using the cache" in result.stdout
        with pytest.raises(CacheBusyError):
            with cache.lock(wait=False):
                pass


def test_stage_json_records_what_made_the_output(tiny_config):
    assert run_cli("build", tiny_config, "--until", "adapt").returncode == 0
    record = next((tiny_config.parent / "builds" / "tiny").glob("adapt-*")) / "stage.json"
    meta = json.loads(record.read_text())
    assert set(meta) >= {"key", "inputs", "config", "versions", "wall_time_s", "metrics"}
    assert meta["versions"]["torch"] and "teacher" in meta["inputs"]
    assert meta["config"]["teacher"]["source"] == "train"
