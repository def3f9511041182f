"""The `release` stage run the way the runner runs it: upstream records committed in a real build cache."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml

from pipeline.cache import BuildCache
from pipeline.config import parse_config
from pipeline.errors import ConfigError
from pipeline.progress import ProgressDisplay
from pipeline.release.verify import verify_bundle
from pipeline.runner import Build
from pipeline.stage import StageContext, StageRecord
from pipeline.stages.release import ReleaseStage

from .test_release import BUDGETS, make_export_dir, make_validate_dir, release_config


def _commit(cache: BuildCache, name: str, key: str, inputs: dict, metrics: dict, fill=None) -> StageRecord:
    with cache.staging(name, key) as tmp:
        if fill is not None:
            for item in fill.iterdir():
                shutil.move(str(item), tmp / item.name)
        meta = {"stage": name, "key": key, "inputs": inputs, "device": "cpu", "seed": 7,
                "versions": {"python": "3.11"}, "wall_time_s": 41.7, "metrics": metrics}
        final = cache.commit(tmp, name, key, meta)
    return StageRecord(name, key, final, meta)


def upstream(root: Path, scratch: Path) -> dict[str, StageRecord]:
    """teacher -> distill -> export -> validate, committed like the runner commits them."""
    cache = BuildCache(root)
    keys = {n: (n[0] * 64) for n in ("teacher", "distill", "export", "validate")}
    _commit(cache, "teacher", keys["teacher"], {}, {"teacher_test_acc": 0.93})
    distill = _commit(cache, "distill", keys["distill"], {"teacher": keys["teacher"]}, {"student_test_acc": 0.9})
    export = _commit(cache, "export", keys["export"], {"distill": keys["distill"]}, {"onnx_parity": 1.0},
                     fill=make_export_dir(scratch / "e"))
    validate = _commit(cache, "validate", keys["validate"], {"export": keys["export"]},
                       {"budgets": BUDGETS, "accuracy": {"model.onnx": 0.9}}, fill=make_validate_dir(scratch / "v"))
    return {"distill": distill, "export": export, "validate": validate}


def run_release(output: Path, scratch: Path) -> StageRecord:
    raw = release_config()
    raw["build"]["output"] = "builds"  # relative, as shipped: an absolute path would enter the manifest
    cfg = parse_config(raw)
    cache = BuildCache(output / cfg.build.name)
    inputs = upstream(cache.root, scratch)
    stage = ReleaseStage()
    key = "r" * 64
    with cache.staging("release", key) as tmp:
        ctx = StageContext(cfg, tmp, inputs, ProgressDisplay(enabled=False), key)
        metrics = stage.run(ctx)
        meta = {"stage": "release", "key": key, "wall_time_s": 1.0, "metrics": metrics}
        final = cache.commit(tmp, "release", key, meta)
    record = StageRecord("release", key, final, meta)
    stage.after_commit(record, ctx)
    return record


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    return [run_release(tmp_path_factory.mktemp(f"build{i}"), tmp_path_factory.mktemp(f"scratch{i}"))
            for i in range(2)]


def test_the_stage_writes_a_verified_bundle_and_points_release_at_it(records):
    record = records[0]
    link = record.dir.parent / "release"
    assert link.is_symlink() and link.resolve() == record.dir.resolve()
    tarball = link / record.metrics["tarball"]
    assert tarball.name == "tiny-1.2.3.tar.gz" and tarball.is_file()
    assert verify_bundle(tarball).ok and verify_bundle(link / "bundle").ok
    assert verify_bundle(link).files_checked == len(verify_bundle(tarball).manifest.files)  # finds bundle/
    assert record.metrics["budget_verdict"] == "pass"


def test_the_manifest_follows_the_whole_stage_chain_without_wall_times(records):
    manifest = json.loads((records[0].dir / "bundle" / "manifest.json").read_text())
    assert sorted(manifest["stages"]) == ["distill", "export", "teacher", "validate"]
    assert manifest["stages"]["teacher"] == {"key": "t" * 64, "device": "cpu", "seed": 7,
                                             "versions": {"python": "3.11"},
                                             "metrics": {"teacher_test_acc": 0.93}}
    assert manifest["budgets"] == BUDGETS
    assert "wall_time" not in json.dumps(manifest) and "41.7" not in json.dumps(manifest)


def test_two_stage_runs_in_fresh_build_folders_give_the_same_bundle(records):
    a, b = (json.loads((r.dir / "bundle" / "manifest.json").read_text()) for r in records)
    # The git state is read at release time; another commit in between may change it, nothing else can.
    a.pop("source"), b.pop("source")
    assert a == b
    assert records[0].metrics["content_sha256"] == records[1].metrics["content_sha256"]


def test_inputs_follow_the_enabled_sections():
    raw = release_config()
    assert ReleaseStage().inputs(parse_config(raw)) == ("distill", "export", "validate")
    raw.pop("validate")
    assert ReleaseStage().inputs(parse_config(raw)) == ("distill", "export")


def test_a_release_without_export_is_a_config_error():
    raw = release_config()
    raw.pop("export")
    raw.pop("validate")
    with pytest.raises(ConfigError, match="release.*needs export"):
        Build(parse_config(raw)).plan()


@pytest.mark.slow
def test_a_real_tiny_build_releases_a_verified_bundle_that_rebuilds_byte_identically(write_config):
    """The whole chain through the CLI: the bundle holds what export and validate really wrote."""
    from .conftest import run_cli

    config = write_config(**{"qat": {}, "export": {"eval_images": 80},
                             "validate.latency": {"min_queries": 32, "min_duration_s": 0.1, "warmup": 2,
                                                  "throughput_batch": 8},
                             "release": {"version": "0.0.1"}})
    first = run_cli("build", config)
    assert first.returncode == 0, first.stdout + first.stderr
    release = config.parent / "builds" / "tiny" / "release"
    tarball = release / "tiny-0.0.1.tar.gz"
    original = tarball.read_bytes()
    manifest = json.loads((release / "bundle" / "manifest.json").read_text())
    names = {f["path"] for f in manifest["files"]}
    assert {"model.onnx", "model.int8.onnx", "openvino/model.xml", "openvino/model.bin", "eval.npz",
            "artifacts.json", "report.html", "MODEL_CARD.md", "device_tests/conftest.py"} <= names
    assert any(n.startswith("results/results-") for n in names) and manifest["measurement_conditions"]
    assert manifest["budget_verdict"] in ("pass", "none")

    # Release again from the very same upstream folders. (A second `edgesmith build --force release` would
    # re-key every stage if anyone edited the code in between, so it is done in-process on the committed records.)
    again = _release_again(config, release.resolve())
    before, after = _members(original), _members(again.read_bytes())
    manifest_name = "tiny-0.0.1/manifest.json"
    first_manifest, second_manifest = (json.loads(m.pop(manifest_name)) for m in (before, after))
    assert before == after, "every file but the manifest is byte-identical"
    # The manifest records the git state at release time; other commits to this repository may land between
    # the two releases. Apart from that it must match, and with an unchanged git state so must the tarball.
    if first_manifest["source"] == second_manifest["source"]:
        assert again.read_bytes() == original
    first_manifest.pop("source"), second_manifest.pop("source")
    assert first_manifest == second_manifest
    checked = run_cli("verify", tarball)
    assert checked.returncode == 0 and f"{len(names)} files match" in checked.stdout, checked.stdout


def _release_again(config: Path, stage_dir: Path) -> Path:
    from pipeline.config import load_config

    cfg = load_config(config)
    cache = BuildCache(stage_dir.parent)
    meta = json.loads((stage_dir / "stage.json").read_text())
    inputs = {name: StageRecord(name, key, cache.path(name, key), cache.lookup(name, key))
              for name, key in meta["inputs"].items()}
    out = stage_dir.parent.parent / "again"
    out.mkdir()
    ReleaseStage().run(StageContext(cfg, out, inputs, ProgressDisplay(enabled=False), meta["key"]))
    return out / "tiny-0.0.1.tar.gz"


def _members(tar_bytes: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        return {m.name: tar.extractfile(m).read() if m.isfile() else b"" for m in tar.getmembers()}


@pytest.mark.slow
def test_a_failed_validation_removes_the_release_link_to_an_older_release(write_config):
    """After a build whose validation fails, `release` must not keep pointing at the older passing release."""
    from .conftest import run_cli

    tiny = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml").read_text())
    config = write_config(**{name: tiny[name] for name in ("qat", "export", "validate", "release")})
    first = run_cli("build", config)
    assert first.returncode == 0, first.stdout + first.stderr
    build_dir = config.parent / "builds" / "tiny"
    link = build_dir / "release"
    assert link.is_symlink() and (link / "bundle" / "manifest.json").is_file()
    old_release = link.resolve()

    failed = run_cli("build", config, "--set", "validate.budgets.min_accuracy=1.0")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "Validation missed" in failed.stdout + failed.stderr
    assert not link.exists() and not link.is_symlink(), "release still points at the older release"
    assert "removed the `release` link" in failed.stdout + failed.stderr
    assert (old_release / "bundle" / "manifest.json").is_file(), "the older release folder itself is kept"

    again = run_cli("build", config)           # passing again (all cached): the link is back
    assert again.returncode == 0, again.stdout + again.stderr
    assert link.is_symlink() and link.resolve() == old_release


def test_refusing_a_failed_validation_removes_the_release_link(tmp_path):
    from pipeline.release.bundle import ReleaseError
    from pipeline.stages.release import refresh_release_link, refuse_failed_validation

    build_dir = tmp_path / "tiny"
    (build_dir / "release-old").mkdir(parents=True)
    (build_dir / "validate-new").mkdir()
    refresh_release_link(build_dir / "release-old")
    assert (build_dir / "release").is_symlink()
    validate = StageRecord("validate", "v" * 64, build_dir / "validate-new",
                           {"metrics": {"passed": False, "missed": 1, "checks": 2}})
    with pytest.raises(ReleaseError, match="no release is cut"):
        refuse_failed_validation(parse_config(release_config()), validate)
    assert not (build_dir / "release").is_symlink() and (build_dir / "release-old").is_dir()


def test_a_missed_validation_budget_removes_the_release_link(tmp_path):
    from pipeline.errors import BudgetError
    from pipeline.stages.release import refresh_release_link
    from pipeline.stages.validate import ValidateStage

    build_dir = tmp_path / "tiny"
    (build_dir / "release-old").mkdir(parents=True)
    (build_dir / "validate-new").mkdir()
    refresh_release_link(build_dir / "release-old")
    missed = {"target": "local", "artifact": "model.onnx", "runtime": "onnxruntime", "budget": "min_accuracy",
              "measured": 0.25, "allowed": 1.0, "ok": False}
    record = StageRecord("validate", "v" * 64, build_dir / "validate-new", {"metrics": {"budgets": [missed]}})
    with pytest.raises(BudgetError):
        ValidateStage().after_commit(record, None)
    assert not (build_dir / "release").exists() and not (build_dir / "release").is_symlink()
