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
                                        help="exit 1 if config, metrics or files differ (for CI)"),
) -> None:
    """Config differences, metric deltas and changed artifacts between two release bundles."""
    result = diff_bundles(a, b)
    typer.echo(render_diff(result), nl=False)
    if fail_on_change and result.substantive:
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
