"""The build's verdict is a property of the build, not of one stage run (tiny real builds through the CLI):
a cached validation with missed checks fails every build with its table and cuts no release, unless
release.allow_failed_validation says so (then the model card's first line does too); a target that could not
be reached is not cached as a result but tried again on the next build."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import run_cli, tiny_config_dict
from tests.helpers import TINY_LATENCY, free_port

EXPORT = {"export.formats": ["onnx"], "export.parity_limit": 50, "export.eval_images": 40}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """One build folder for the module: the stages up to export are built once and reused by every config."""
    return tmp_path_factory.mktemp("verdict")


def write(folder, name: str, **overrides):
    raw = tiny_config_dict(folder / "builds", **EXPORT, **{"validate.latency": TINY_LATENCY}, **overrides)
    path = folder / name
    path.write_text(yaml.safe_dump(raw))
    return path


def output(proc) -> str:
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_cached_failed_validation_fails_every_build_and_cuts_no_release(folder):
    cfg = write(folder, "missed.yaml", **{"validate.budgets": {"max_p90_ms": 1e-6}, "release": {"version": "0.0.1"}})
    builds = folder / "builds" / "tiny"
    first = run_cli("build", cfg)
    assert first.returncode == 1, output(first)[-3000:]
    assert "MISSED" in output(first) and "max_p90_ms" in output(first)
    second = run_cli("build", cfg)
    assert "validate   cached" in second.stdout, second.stdout[-3000:]
    assert second.returncode == 1 and "MISSED" in output(second) and "max_p90_ms" in output(second)
    assert "no release is cut" in output(second)
    assert not list(builds.glob("release-*")) and not (builds / "release").exists()

    allowed = write(folder, "allowed.yaml", **{"validate.budgets": {"max_p90_ms": 1e-6},
                                              "release": {"version": "0.0.1", "allow_failed_validation": True}})
    shipped = run_cli("build", allowed)
    assert shipped.returncode == 0, output(shipped)[-3000:]
    assert "validate   cached" in shipped.stdout and "allow_failed_validation" in output(shipped)
    card = (builds / "release" / "bundle" / "MODEL_CARD.md").read_text().splitlines()
    assert card[0].startswith("**WARNING: this release FAILED validation") and "allow_failed_validation" in card[0]


@pytest.mark.slow
def test_a_passing_validation_releases_with_a_plain_card(folder):
    cfg = write(folder, "passed.yaml", **{"validate.budgets": {"max_size_mb": 100.0}, "release": {"version": "0.0.2"}})
    proc = run_cli("build", cfg)
    assert proc.returncode == 0, output(proc)[-3000:]
    release = folder / "builds" / "tiny" / "release"
    assert (release / "bundle" / "MODEL_CARD.md").read_text().startswith("# Model card: tiny 0.0.2")
    again = run_cli("build", cfg)
    assert again.returncode == 0 and "running" not in again.stdout


@pytest.mark.slow
def test_an_unreachable_target_is_tried_again_on_the_next_build(folder):
    unreachable = f"ssh://nobody@127.0.0.1:{free_port()}"
    cfg = write(folder, "unreachable.yaml", **{"validate.targets": ["local", unreachable],
                                               "validate.ssh": {"connect_timeout_s": 5}})
    first = run_cli("build", cfg)
    assert first.returncode == 1 and "Cannot reach 127.0.0.1" in output(first), output(first)[-3000:]
    second = run_cli("build", cfg)
    assert second.returncode == 1 and "Cannot reach 127.0.0.1" in output(second)
    assert "validate   cached" not in second.stdout
    assert "records a failure to retry: running again" in second.stdout, second.stdout[-3000:]


def test_the_release_stage_itself_refuses_a_failed_validation(tmp_path):
    from pipeline.config import parse_config
    from pipeline.progress import ProgressDisplay
    from pipeline.release.bundle import ReleaseError
    from pipeline.stage import StageContext, StageRecord
    from pipeline.stages.release import ReleaseStage

    from .test_release import BUDGETS, release_config
    from .test_release_stage import upstream

    failed = [{**BUDGETS[0], "ok": False}, *BUDGETS[1:]]
    for allow in (False, True):
        raw = release_config()
        raw["release"]["allow_failed_validation"] = allow
        cfg = parse_config(raw)
        root = tmp_path / f"allow{allow}"
        inputs = upstream(root, tmp_path / f"scratch{allow}")
        v = inputs["validate"]
        inputs["validate"] = StageRecord("validate", v.key, v.dir, {**v.meta, "metrics": {
            **v.metrics, "budgets": failed, "passed": False, "checks": len(failed), "missed": 1}})
        out = root / "release-out"
        out.mkdir()
        ctx = StageContext(cfg, out, inputs, ProgressDisplay(enabled=False), "r" * 64)
        if not allow:
            with pytest.raises(ReleaseError, match="1 of .* checks missed; no release is cut"):
                ReleaseStage().run(ctx)
            assert not (out / "bundle").exists()
        else:
            ReleaseStage().run(ctx)
            first = (out / "bundle" / "MODEL_CARD.md").read_text().splitlines()[0]
            assert first.startswith("**WARNING: this release FAILED validation (1 of")
