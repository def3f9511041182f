"""`edgesmith verify` and `edgesmith diff`; added to the main app in pipeline/cli.py."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .diff import diff_bundles, render_diff
from .signing import SIGNATURE_NAME
from .verify import check_bundle, check_signature, is_signed


def verify(
    bundle: Path = typer.Argument(..., help="release bundle folder or .tar.gz"),
    public_key: Optional[Path] = typer.Option(None, "--public-key",
                                              help="PEM public key of the signer: also check bundle.sig"),
) -> None:
    """Check every file of a release bundle against its manifest, that it is safe to unpack, and with
    --public-key that it is signed by that key's holder."""
    result = check_bundle(bundle)  # raises VerifyError listing every problem
    manifest = result.manifest
    summary = (f"{result.files_checked} files match manifest.json ({manifest.build} {manifest.version}, "
               f"content {manifest.content_sha256[:16]}, budgets: {manifest.budget_verdict})")
    if public_key is not None:
        check_signature(bundle, public_key)  # raises SignatureError
        typer.echo(f"OK {bundle}: {summary}; signature {SIGNATURE_NAME} verifies with {public_key}")
        return
    note = ("signed, but the signature was not checked: pass --public-key" if is_signed(bundle) else "unsigned")
    typer.echo(f"OK {bundle}: {summary}. {note} (the manifest proves integrity, not who made the bundle)")


def diff(
    a: Path = typer.Argument(..., help="first bundle (folder or .tar.gz)"),
    b: Path = typer.Argument(..., help="second bundle (folder or .tar.gz)"),
    fail_on_change: bool = typer.Option(False, "--fail-on-change",
                                        help="exit 1 if what defines the model differs: model files of any format, "
                                             "artifacts.json minus measured fields, preprocessing, labels, eval set, "
                                             "recorded config (measured results are shown but do not gate)"),
    max_accuracy_drop: Optional[float] = typer.Option(None, "--max-accuracy-drop", min=0.0,
                                                      help="exit 1 if any artifact's accuracy in B is lower than in A "
                                                           "by more than this (absolute, e.g. 0.005)"),
    fail_on_any_change: bool = typer.Option(False, "--fail-on-any-change",
                                            help="exit 1 if anything but the environment differs, measured "
                                                 "results included"),
) -> None:
    """Config differences, metric deltas and changed artifacts between two release bundles."""
    result = diff_bundles(a, b)
    typer.echo(render_diff(result), nl=False)
    failed = []
    if fail_on_change:
        changes = result.model_changes
        typer.echo(f"\nmodel: {'differs (' + str(len(changes)) + ')' if changes else 'identical'} "
                   f"(--fail-on-change)")
        failed += changes
    if max_accuracy_drop is not None:
        drops = result.accuracy_drops(max_accuracy_drop)
        for key, x, y in drops:
            typer.echo(f"accuracy of {key} dropped {x:.6g} -> {y:.6g} ({y - x:+.6g}), more than "
                       f"--max-accuracy-drop {max_accuracy_drop:g}")
        if not result.accuracy:
            typer.echo("--max-accuracy-drop: no artifact has an accuracy recorded in both bundles")
        elif not drops:
            typer.echo(f"accuracy: no artifact dropped more than {max_accuracy_drop:g} "
                       f"({len(result.accuracy)} compared)")
        failed += drops
    if fail_on_any_change and result.substantive:
        failed.append("any change")
    if failed:
        raise typer.Exit(1)


def track(
    bundle: Path = typer.Argument(..., help="release bundle folder or .tar.gz"),
    mlflow_uri: str = typer.Option(..., "--mlflow", help="MLflow tracking URI, e.g. sqlite:///mlflow.db"),
    experiment: Optional[str] = typer.Option(None, "--experiment", help="experiment name (default: the build name)"),
    artifacts: Optional[str] = typer.Option(None, "--artifacts",
                                            help="where a new experiment stores files (default: MLflow's ./mlruns)"),
) -> None:
    """Verify a release bundle, then log its config, metrics and files as one MLflow run (extra: mlflow)."""
    from .tracking import log_release

    run_id = log_release(bundle, mlflow_uri, experiment, artifacts)
    typer.echo(f"logged {bundle} to {mlflow_uri} as run {run_id}")
