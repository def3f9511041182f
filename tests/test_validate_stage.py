"""The validate stage on a real bundle: the suite runs on every target, results and report are committed,
budgets are checked against what was measured, and a miss (or an unreachable target) fails the build only
after everything is recorded."""

import json

import pytest

from pipeline.config import parse_config
from pipeline.errors import BudgetError, ConfigError
from pipeline.progress import ProgressDisplay
from pipeline.stage import StageContext, StageRecord
from pipeline.stages.validate import ValidateStage
from pipeline.validation.budgets import check
from pipeline.validation.config import Budgets
from pipeline.validation.suite import TargetRun
from tests.conftest import tiny_config_dict
from tests.helpers import TINY_LATENCY, free_port, shared_bundle


def config(tmp_path, **validate):
    raw = tiny_config_dict(tmp_path / "builds")
    raw["validate"] = {"latency": TINY_LATENCY, **validate}
    return parse_config(raw)


def run_stage(tmp_path, cfg):
    out = tmp_path / "validate"
    out.mkdir()
    export = StageRecord("export", "k" * 64, shared_bundle(), {})
    ctx = StageContext(cfg, out, {"export": export}, ProgressDisplay(enabled=False), "v" * 64)
    metrics = ValidateStage().run(ctx)
    return StageRecord("validate", "v" * 64, out, {"metrics": metrics}), ctx


@pytest.fixture(scope="module")
def missed(tmp_path_factory):
    """Local target plus an SSH target where nothing listens; a p90 budget no model can meet."""
    tmp = tmp_path_factory.mktemp("missed")
    unreachable = f"ssh://nobody@127.0.0.1:{free_port()}"
    cfg = config(tmp, targets=["local", unreachable], budgets={"max_p90_ms": 1e-6, "min_accuracy": 0.0},
                 ssh={"connect_timeout_s": 5})
    record, ctx = run_stage(tmp, cfg)
    return record, ctx, unreachable


@pytest.mark.slow
def test_results_and_report_are_committed(missed):
    record, _, unreachable = missed
    files = {p.name for p in record.dir.iterdir()}
    assert {"results-local.json", "report.html", "report.md", "suite-local.log"} <= files
    results = json.loads((record.dir / "results-local.json").read_text())
    listed = json.loads((shared_bundle() / "artifacts.json").read_text())["artifacts"]
    assert len(results["runs"]) == len(listed) == len(record.metrics["artifacts"])
    html = (record.dir / "report.html").read_text()
    assert "data:image/png;base64," in html and "max_p90_ms" in html and "Cannot reach" in html


@pytest.mark.slow
def test_missed_budget_and_unreachable_target_fail_after_commit(missed):
    record, ctx, unreachable = missed
    assert record.metrics["passed"] is False
    with pytest.raises(BudgetError) as err:
        ValidateStage().after_commit(record, ctx)
    message = err.value.message
    assert err.value.exit_code == 1
    assert "max_p90_ms" in message and "MISSED" in message and "measured" in message and "allowed" in message
    assert unreachable in message and "Cannot reach 127.0.0.1" in message
    assert str(record.dir) in message  # where the kept results are
    rows = [v for v in record.metrics["budgets"] if v["budget"] == "max_p90_ms"]
    assert len(rows) == len(record.metrics["artifacts"]) and not any(v["ok"] for v in rows)
    assert all(v["ok"] for v in record.metrics["budgets"] if v["budget"] == "min_accuracy")


@pytest.mark.slow
def test_budgets_are_checked_against_the_measured_values(missed):
    record, _, _ = missed
    results = json.loads((record.dir / "results-local.json").read_text())
    runs = {r["artifact"] + "@" + r["runtime"]: r for r in results["runs"]}
    top1 = {k: r["accuracy"]["top1"] for k, r in runs.items()}
    p99 = {k: r["latency"]["model"]["p99_ms"] for k, r in runs.items()}
    size = {k: r["size_bytes"] / 2**20 for k, r in runs.items()}
    middle_acc = sorted(top1.values())[len(top1) // 2]
    middle_p99 = sorted(p99.values())[len(p99) // 2]
    budgets = Budgets(min_accuracy=middle_acc, max_drop_vs_fp32=0.0, max_p99_ms={"local": middle_p99},
                      max_size_mb=max(size.values()))
    verdicts = check([TargetRun("local", results)], budgets)
    got = {(v.artifact + "@" + v.runtime, v.budget): v.ok for v in verdicts}
    for k, r in runs.items():
        acc = r["accuracy"]
        assert got[(k, "min_accuracy")] == (top1[k] >= middle_acc)
        assert got[(k, "max_drop_vs_fp32")] == (acc["fp32_top1"] - acc["top1"] <= 1e-9)
        assert got[(k, "max_p99_ms")] == (p99[k] <= middle_p99)
        assert got[(k, "max_size_mb")] is True
    assert got[("-@-", "device tests")] is True


def test_a_target_error_is_a_failed_row_not_a_lost_result():
    verdicts = check([TargetRun("ssh://pi@board", None, "Cannot reach board:22")], Budgets(min_accuracy=0.5))
    assert [(v.budget, v.ok) for v in verdicts] == [("target ran the suite", False)]


def test_unknown_budget_key_is_a_config_error(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["validate"] = {"budgets": {"max_p90": 5}}
    with pytest.raises(ConfigError, match=r"validate\.budgets\.max_p90: unknown key\. Did you mean 'max_p90_ms'"):
        parse_config(raw)


@pytest.mark.parametrize("validate,match", [
    ({"runtimes": ["tensorflow"]}, r"validate\.runtimes\.0"),
    ({"targets": ["ssh://board"]}, "needs a user"),
    ({"targets": ["local"], "budgets": {"max_p99_ms": {"ssh://pi@x": 3}}}, "not in targets"),
    ({"budgets": {"min_accuracy": 85}}, r"min_accuracy"),
    ({"latency": {"min_queries": 0}}, r"validate\.latency\.min_queries"),
])
def test_bad_validate_sections_are_config_errors(tmp_path, validate, match):
    raw = tiny_config_dict(tmp_path)
    raw["validate"] = validate
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_defaults_follow_the_measurement_protocol(tmp_path):
    cfg = parse_config({**tiny_config_dict(tmp_path), "validate": {}}).section("validate")
    assert cfg.targets == ["local"] and cfg.runtimes == ["onnxruntime", "openvino"] and cfg.threads == 1
    assert cfg.latency.min_queries == 1024 and cfg.latency.min_duration_s == 2.0 and cfg.precision_hint == "f32"
    assert all(v is None for v in cfg.budgets.model_dump().values())


def test_every_registered_runner_is_a_valid_runtime_and_nothing_else(tmp_path):
    from device_tests.runners import RUNNERS

    raw = {**tiny_config_dict(tmp_path), "validate": {"runtimes": sorted(RUNNERS)}}
    assert parse_config(raw).section("validate").runtimes == sorted(RUNNERS)
    with pytest.raises(ConfigError, match="'onnxruntime'"):  # the error lists the valid names
        parse_config({**raw, "validate": {"runtimes": ["onnxrt"]}})
