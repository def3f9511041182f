"""Optional MLflow tracking: what is logged (always tested) and the logging itself (only with mlflow installed)."""

from __future__ import annotations

import importlib.util
import re

import pytest

from pipeline.release.bundle import ReleaseSources, assemble_release
from pipeline.release.tracking import TrackingError, log_release, release_metrics, release_params, release_tags

from .test_release import make_export_dir, release_info

HAVE_MLFLOW = importlib.util.find_spec("mlflow") is not None
MLFLOW_KEY = re.compile(r"^[A-Za-z0-9_\-. /:]+$")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    up = tmp_path_factory.mktemp("up")
    return assemble_release(tmp_path_factory.mktemp("rel"), ReleaseSources(make_export_dir(up), None, None),
                            release_info())


def test_params_metrics_and_tags_come_from_the_manifest(release):
    manifest = release.manifest
    params, metrics = release_params(manifest), release_metrics(manifest)
    assert params["distill.temperature"] == "4.0" and params["build.seed"] == "7"
    assert params["subtask.classes"] == "['T-shirt/top', 'Shirt', 'Pullover']"
    assert metrics["distill.student_test_acc"] == 0.9
    assert metrics["validate.budgets.0.ok"] == 1.0 and metrics["validate.budgets.0.measured"] == 0.21
    assert "validate.budgets.0.artifact" not in metrics  # strings are not metrics
    assert all(MLFLOW_KEY.match(k) for k in [*params, *metrics])
    assert release_tags(manifest)["edgesmith.content_sha256"] == manifest.content_sha256


@pytest.mark.skipif(HAVE_MLFLOW, reason="checks the error shown when mlflow is absent")
def test_tracking_without_mlflow_is_a_clear_error(release):
    with pytest.raises(TrackingError, match=r"pip install 'edgesmith\[mlflow\]'"):
        log_release(release.tarball, "sqlite:///unused.db")


@pytest.mark.skipif(not HAVE_MLFLOW, reason="mlflow is an optional extra (edgesmith[mlflow]) and is not installed")
def test_a_release_is_logged_to_a_local_mlflow_store(tmp_path, release):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = tmp_path / "artifacts"
    run_id = log_release(release.bundle_dir, uri, experiment="edgesmith-test", artifact_location=artifacts.as_uri())
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.params["build.seed"] == "7"
    assert run.data.metrics["distill.student_test_acc"] == 0.9
    assert run.data.tags["edgesmith.content_sha256"] == release.manifest.content_sha256
    logged = {a.path for a in MlflowClient(uri).list_artifacts(run_id, "bundle")}
    assert "bundle/manifest.json" in logged and "bundle/model.onnx" in logged
    stored = next(artifacts.rglob("manifest.json"))  # the files really are in the given location
    assert stored.read_bytes() == (release.bundle_dir / "manifest.json").read_bytes()
