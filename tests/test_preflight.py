"""What `check` and `build` catch before any stage runs (pipeline.preflight.check_build), and the build folder's
OSErrors as one clear message: build.output that is a file or under one, a folder without write permission (or a
missing parent that cannot be created there), qat.keep_fp32 names that are not layers of the student, and a fully
cached build on a read-only cache, which runs without the lock and writes nothing.

Tests run as root in CI, where a 0555 folder does not stop writes: the CLI then runs without root's permission
override (setpriv drops CAP_DAC_OVERRIDE from its bounding set), and the tests that need it skip where that fails."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, tiny_config_dict

DROP_ROOT_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--"]


def _as_plain_user(tmp_path: Path) -> list[str]:
    """A command prefix under which a 0555 folder cannot be written (empty when not root); skips if none works."""
    if os.geteuid() != 0:
        return []
    probe = tmp_path / "probe-0555"
    probe.mkdir()
    probe.chmod(0o555)
    try:
        if shutil.which("setpriv"):
            subprocess.run([*DROP_ROOT_OVERRIDE, "touch", str(probe / "x")], capture_output=True, timeout=30)
            if not (probe / "x").exists():
                return DROP_ROOT_OVERRIDE
    finally:
        probe.chmod(0o755)
        shutil.rmtree(probe)
    pytest.skip("running as root and setpriv cannot drop CAP_DAC_OVERRIDE here: a read-only folder cannot be simulated")


def edgesmith(*args, prefix: list[str] = ()) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", "pipeline.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=600, env=env)


def config_at(tmp_path: Path, output, name: str = "cfg.yaml", remove=("qat", "export", "validate", "release"),
              **overrides) -> Path:
    cfg = tiny_config_dict(output, **overrides)
    for section in remove:
        cfg.pop(section, None)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    path.chmod(0o644)
    return path


def tree(root: Path) -> dict[str, tuple]:
    """Every path under root with its kind, size and mtime: what a read-only build must leave as it was."""
    return {str(p.relative_to(root)): (stat.S_IFMT(p.lstat().st_mode), p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def assert_clear_error(proc: subprocess.CompletedProcess, *expected: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout.startswith("error: "), proc.stdout
    for text in expected:
        assert text in proc.stdout, proc.stdout


@pytest.mark.parametrize("under", ["", "sub/deeper"])
def test_build_output_that_is_a_file_is_a_clear_error(tmp_path, under):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("keep me")
    cfg = config_at(tmp_path, blocker / under if under else blocker)
    before = tree(tmp_path)
    for command in ("check", "build"):
        proc = edgesmith(command, cfg)
        assert_clear_error(proc, f"{blocker} (a parent of", "is a file; build.output must name a folder",
                           "Set build.output to a folder")
    assert tree(tmp_path) == before and blocker.read_text() == "keep me"


@pytest.mark.parametrize("below", ["", "missing/parents"])
def test_an_unwritable_build_output_is_a_clear_error(tmp_path, below):
    prefix = _as_plain_user(tmp_path)
    locked = tmp_path / "read-only"
    locked.mkdir()
    locked.chmod(0o555)
    cfg = config_at(tmp_path, locked / below if below else locked)
    try:
        for command in ("check", "build"):
            proc = edgesmith(command, cfg, prefix=prefix)
            assert_clear_error(proc, "cannot be created or written: no permission to write in "
                               f"{locked}.", "Set build.output to a folder you can write", "chmod u+w")
        assert list(locked.iterdir()) == []          # no build folder, no .lock, no probe left behind
    finally:
        locked.chmod(0o755)


def test_the_lock_turns_an_oserror_into_a_cache_error(tmp_path):
    from pipeline.cache import BuildCache, folder_problem
    from pipeline.errors import CacheError

    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CacheError, match="a file is in the way"):
        with BuildCache(blocker).lock():
            pass
    with pytest.raises(CacheError, match="a file is in the way"):
        with BuildCache(blocker / "sub").lock():
            pass
    assert folder_problem(tmp_path / "new" / "build") is None and list(tmp_path.iterdir()) == [blocker]


def test_an_unknown_keep_fp32_layer_fails_before_any_stage(tmp_path):
    cfg = config_at(tmp_path, tmp_path / "builds", remove=("export", "validate", "release"),
                    **{"qat.keep_fp32": ["features.0.00"]})
    for command in ("check", "build"):
        proc = edgesmith(command, cfg)
        assert_clear_error(proc, "qat.keep_fp32 names 'features.0.00', which is not a Conv or Linear layer of this "
                           "student. Did you mean 'features.0.0'?", "(features.0.0, features.1.0, head.1)")
    assert not list((tmp_path / "builds").glob("*/*-*"))   # no teacher, adapt or distill was run


def test_unknown_distill_layer_names_fail_before_any_stage(tmp_path):
    pairs = [{"teacher": "features.1", "student": "features.0"}, {"teacher": "features.1", "student": "feature.1"}]
    cfg = config_at(tmp_path, tmp_path / "builds", **{"distill.method": "fitnet", "distill.layers": pairs})
    for command in ("check", "build"):
        assert_clear_error(edgesmith(command, cfg), "distill.layers: the student has no module named 'feature.1'. "
                           "Did you mean 'features.1'?")
    assert not list((tmp_path / "builds").glob("*/*-*"))   # no stage ran
    pairs[1]["student"] = "features.1"
    assert edgesmith("check", config_at(tmp_path, tmp_path / "builds", "ok.yaml", **{
        "distill.method": "fitnet", "distill.layers": pairs})).returncode == 0


def test_a_fully_cached_build_runs_on_a_read_only_cache(tmp_path):
    prefix = _as_plain_user(tmp_path)
    cfg = config_at(tmp_path, tmp_path / "builds")
    first = edgesmith("build", cfg)
    assert first.returncode == 0, first.stdout + first.stderr
    folder = tmp_path / "builds"
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod(path.stat().st_mode & ~0o222)
    before = tree(folder)
    try:
        again = edgesmith("build", cfg, prefix=prefix)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "Traceback" not in again.stderr
        assert "every stage is cached and the cache is read-only, so this build runs without the lock" in again.stdout
        assert "running (key" not in again.stdout and again.stdout.count("cached  ") == 3, again.stdout
        checked = edgesmith("check", cfg, prefix=prefix)
        assert checked.returncode == 0 and "build reuses them without the lock" in checked.stdout, checked.stdout
        forced = edgesmith("build", cfg, "--force", "distill", prefix=prefix)
        assert_clear_error(forced, "cannot be created or written: no permission to write in",
                           "Not every stage is cached: distill must run and write there.")
        changed = edgesmith("check", cfg, "--set", "distill.epochs=3", prefix=prefix)
        assert_clear_error(changed, "Not every stage is cached: distill must run")
        assert tree(folder) == before                       # nothing written: no lock, no digests, no sweep
    finally:
        for path in [folder, *folder.rglob("*")]:
            if not path.is_symlink():
                path.chmod(path.stat().st_mode | 0o200)
