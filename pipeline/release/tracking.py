"""Optional experiment tracking: log a release's config, metrics and files to MLflow.

mlflow is an optional extra (`pip install 'edgesmith[mlflow]'`), imported only here and only when asked for.
Everything logged comes from the verified manifest, so a tracked run describes exactly the shipped bundle.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional

from ..errors import EdgesmithError
from .manifest import Manifest
from .verify import check_bundle

PARAM_VALUE_LIMIT = 6000  # MLflow's maximum parameter value length
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /:]")


class TrackingError(EdgesmithError):
    """The release could not be logged to the experiment tracker."""


def release_params(manifest: Manifest) -> dict[str, str]:
    """The resolved config as flat MLflow parameters (`distill.temperature` -> "4.0")."""
    return {mlflow_key(k): _param_value(v) for k, v in _leaves(manifest.config)}


def release_metrics(manifest: Manifest) -> dict[str, float]:
    """Every numeric stage metric as `<stage>.<path>`; booleans (budget passed) as 0/1; the rest is skipped."""
    metrics = {}
    for stage, entry in manifest.stages.items():
        for path, value in _leaves(entry.metrics, stage):
            if isinstance(value, (int, float)) and not (isinstance(value, float) and math.isinf(value)):
                metrics[mlflow_key(path)] = float(value)
    return metrics


def release_tags(manifest: Manifest) -> dict[str, str]:
    return {"edgesmith.build": manifest.build, "edgesmith.version": manifest.version,
            "edgesmith.content_sha256": manifest.content_sha256, "edgesmith.config_sha256": manifest.config_sha256,
            "edgesmith.budget_verdict": manifest.budget_verdict, "edgesmith.git_commit": manifest.source.git_commit,
            "edgesmith.git_dirty": str(manifest.source.git_dirty)}


def log_release(bundle: Path, tracking_uri: str, experiment: Optional[str] = None,
                artifact_location: Optional[str] = None) -> str:
    """Verify the bundle, then log params, metrics, tags and the bundle's files as one MLflow run; its id.

    `artifact_location` applies when the experiment is new; MLflow's own default for a database store is
    ./mlruns under the current directory.
    """
    mlflow = _import_mlflow()
    manifest = check_bundle(bundle).manifest
    name = experiment or manifest.build
    try:
        mlflow.set_tracking_uri(tracking_uri)
        if artifact_location is not None and mlflow.get_experiment_by_name(name) is None:
            mlflow.create_experiment(name, artifact_location=artifact_location)
        mlflow.set_experiment(name)
        with mlflow.start_run(run_name=f"{manifest.build}-{manifest.version}") as run:
            mlflow.log_params(release_params(manifest))
            mlflow.log_metrics(release_metrics(manifest))
            mlflow.set_tags(release_tags(manifest))
            if Path(bundle).is_dir():
                mlflow.log_artifacts(str(bundle), artifact_path="bundle")
            else:
                mlflow.log_artifact(str(bundle))
            return run.info.run_id
    except mlflow.exceptions.MlflowException as exc:
        raise TrackingError(f"MLflow refused the release at {tracking_uri}: {exc}",
                            "Check the tracking URI; for a local store use a database such as "
                            "sqlite:///path/to/mlflow.db (recent MLflow rejects plain folders).") from None


def _import_mlflow():
    try:
        import mlflow
    except ImportError:
        raise TrackingError("--mlflow needs the optional package mlflow, which is not installed.",
                            "Install it with `pip install 'edgesmith[mlflow]'`, or leave out --mlflow.") from None
    return mlflow


def mlflow_key(path: str) -> str:
    # MLflow keys allow letters, digits, '_', '-', '.', ' ', '/' and ':' only; list indices become '.N'.
    return _KEY_UNSAFE.sub("_", re.sub(r"\[(\d+)\]", r".\1", path))


def _leaves(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict) and value:
        for key in sorted(value, key=str):
            yield from _leaves(value[key], f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, list) and value and any(isinstance(v, (dict, list)) for v in value):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{prefix}[{i}]")
    else:
        yield prefix, value


def _param_value(value: Any) -> str:
    return str(value)[:PARAM_VALUE_LIMIT]
