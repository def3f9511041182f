"""The `edgesmith` command line."""

from __future__ import annotations

import errno
import io
import logging
import sys
from contextlib import nullcontext, redirect_stdout
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import EdgesmithError
from .release.cli import diff, track, verify
from .validation.cli import profile

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Distil a foundation model into a small, quantized, validated model for one edge device.")
console = Console()
SET_HELP = "override one config key, validated like the file: --set distill.epochs=4 (repeatable)"


def load_with_overrides(config: Path, sets: List[str]):
    """The config file with the command line's --set key=value overrides applied."""
    from .config import load_config, parse_overrides

    return load_config(config, parse_overrides(sets))


@app.command()
def check(config: Path = typer.Argument(..., help="YAML build config"),
          sets: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP)) -> None:
    """Validate a config and resolve its subtask classes against the dataset."""
    from .preflight import check_build, check_data

    cfg = load_with_overrides(config, sets)
    notes = check_build(cfg)
    data, note = check_data(cfg)
    for extra in notes:
        console.print(f"[yellow]note[/]: {escape(extra)}", highlight=False, soft_wrap=True)
    if data is None:
        console.print(f"[green]OK[/] {config}: build '{cfg.build.name}', subtask {list(cfg.subtask.classes)}; "
                      f"[yellow]note[/]: {note}")
        return
    console.print(f"[green]OK[/] {config}: build '{cfg.build.name}', dataset {cfg.data.dataset} "
                  f"({len(data.dataset.class_names)} classes), subtask {data.class_names} "
                  f"-> ids {list(data.class_ids)}; train/val/test {len(data.train)}/{len(data.val)}/{len(data.test)}")


@app.command()
def build(
    config: Path = typer.Argument(..., help="YAML build config"),
    force: List[str] = typer.Option([], "--force", help="re-run this stage even if cached (repeatable)"),
    until: Optional[str] = typer.Option(None, "--until", help="stop after this stage"),
    no_wait: bool = typer.Option(False, "--no-wait", help="fail instead of waiting when another build holds the cache"),
    nproc: int = typer.Option(1, "--nproc", min=1, help="processes on this machine (torchrun; one per GPU on CUDA)"),
    sets: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP),
) -> None:
    """Run the chain of stages, reusing every cached one."""
    from . import distributed
    from .data.for_config import subtask_data
    from .preflight import check_build
    from .progress import ProgressDisplay
    from .runner import Build

    cfg = load_with_overrides(config, sets)
    check_build(cfg, until)  # names, qat.keep_fp32, a writable build folder: before any stage runs
    if nproc > 1:
        return launch_build(nproc, config, force, until, no_wait, sets)
    subtask_data(cfg)  # missing data or unknown classes fail here, before the cache is touched
    # Under torchrun only rank 0 shows progress and the summary; the other processes stay quiet (libraries'
    # own progress bars included) until an error of theirs is printed.
    main = distributed.is_main()
    progress = ProgressDisplay(console if main else Console(file=io.StringIO()), enabled=main)
    if not main:
        logging.getLogger("nncf").setLevel(logging.WARNING)
    with nullcontext() if main else redirect_stdout(io.StringIO()):
        summary = Build(cfg).run(progress, force=tuple(force), until=until, wait=not no_wait)
    if main:
        print_summary(summary)


def launch_build(nproc: int, config: Path, force: List[str], until: Optional[str], no_wait: bool,
                 sets: List[str] = ()) -> None:
    """`build --nproc N`: the same build command in N processes started by torchrun on this machine."""
    from . import distributed
    from .errors import DistributedError

    if distributed.world().distributed:
        raise DistributedError("--nproc was given to a build that torchrun already started in several processes.",
                               "Use either torchrun or --nproc, not both.")
    argv = ["build", str(config), *(a for f in force for a in ("--force", f)), *(["--until", until] if until else []),
            *(["--no-wait"] if no_wait else []), *(a for s in sets for a in ("--set", s))]
    failure = distributed.launch(nproc, argv)
    if failure is not None:
        rank, code, message = failure
        console.print(f"[bold red]error:[/] the build failed in process rank {rank} of {nproc} "
                      f"(exit code {code}): {message}", highlight=False, soft_wrap=True)
        sys.exit(code if code > 0 else 1)


@app.command()
def search(config: Path = typer.Argument(..., help="YAML build config with a search section"),
           sets: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP)) -> None:
    """Work on a build's student search alongside others (same machine or several sharing search.storage); the
    build itself then uses the stored trials."""
    from .errors import ConfigError
    from .preflight import check_build
    from .progress import ProgressDisplay
    from .runner import search_worker

    cfg = load_with_overrides(config, sets)
    if cfg.search is None:
        raise ConfigError(f"{config} has no search section: there is nothing to search.",
                          "Add a search section and set student.arch: search (docs/search.md).")
    check_build(cfg)
    trained = search_worker(cfg, ProgressDisplay(console))
    console.print(f"search worker done: trained {trained} candidate(s)")


@app.command()
def status(config: Path = typer.Argument(..., help="YAML build config"),
           sets: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP)) -> None:
    """List the stages of a build and whether each is cached."""
    from .runner import Build

    cfg = load_with_overrides(config, sets)
    b = Build(cfg)
    table = Table("stage", "key", "state", "folder")
    for name, key, cached in b.status():
        table.add_row(name, key, "[green]cached[/]" if cached else "[yellow]to build[/]",
                      str(b.cache.root / f"{name}-{key}") if cached else "")
    console.print(table)


@app.command("suggest-labels")
def suggest_labels(config: Path = typer.Argument(..., help="YAML build config"),
                   count: int = typer.Option(..., "--count", help="images to suggest for labelling"),
                   out: Optional[Path] = typer.Option(None, "--out", help="folder for suggestions.csv and "
                                                      "suggestions.png (default: <build.output>/<build.name>/suggestions)"),
                   sets: List[str] = typer.Option([], "--set", metavar="KEY=VALUE", help=SET_HELP)) -> None:
    """Rank the unlabelled pool for labelling: typical images of distinct clusters while there are no labels
    (TypiClust), then uncertain ones where labels exist; writes a CSV to fill in (data.labels_file) and a
    contact sheet."""
    from .preflight import check_build
    from .progress import ProgressDisplay
    from .suggest import CSV_NAME, SHEET_NAME, candidates, check_count, rank, write_csv, write_sheet

    cfg = load_with_overrides(config, sets)
    check_build(cfg, until="adapt")
    cand = candidates(cfg)                   # a bad labels file or --count fails here, before any stage runs
    check_count(count, len(cand.images))
    suggestions = rank(cfg, cand, count, ProgressDisplay(console))
    folder = out or Path(cfg.build.output) / cfg.build.name / "suggestions"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / CSV_NAME, suggestions)
    write_sheet(folder / SHEET_NAME, suggestions, cand)
    console.print(f"{len(suggestions)} suggestions: {folder / CSV_NAME} (fill in the label column and set "
                  f"data.labels_file to it), contact sheet {folder / SHEET_NAME}", highlight=False, soft_wrap=True)


app.command("profile")(profile)
app.command("verify")(verify)
app.command("diff")(diff)
app.command("track")(track)


HEADLINE_METRICS = ("teacher_subtask_test_acc", "teacher_test_acc", "student_test_acc", "mac_reduction",
                    "adapt_best_val_acc", "best_val_acc")


def print_summary(summary: list[dict]) -> None:
    table = Table("stage", "cached", "time (s)", "key metrics", title="build summary")
    for row in summary:
        metrics = row["metrics"]
        shown = ", ".join(f"{k} {_fmt(metrics[k])}" for k in HEADLINE_METRICS if k in metrics)
        extra = metrics.get("summary", "")
        table.add_row(row["stage"], "yes" if row["cached"] else "no", f"{row['wall_s']:.1f}",
                      "; ".join(filter(None, [shown, extra])))
    console.print(table)
    distill = next((r["metrics"] for r in summary if r["stage"] == "distill"), None)
    if distill:
        console.print(f"teacher subtask accuracy {distill['teacher_test_acc']:.2%}, student subtask accuracy "
                      f"{distill['student_test_acc']:.2%} ({distill['mac_reduction']:.1f}x fewer MACs, "
                      f"{distill['student_params']:,} parameters)")


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def main() -> None:
    from . import distributed

    try:
        # Without standalone mode click returns a command's exit code (typer.Exit(1)) instead of exiting.
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except EdgesmithError as exc:
        distributed.record_failure(exc)      # under torchrun: the message the launcher reports for this rank
        # escaped: a message names `.[mobile]` or echoes the user's value, which rich would read as markup
        console.print(f"[bold red]error{_rank_tag()}:[/] {escape(exc.message)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        console.print("[red]interrupted[/]: nothing half-written was kept in the cache.")
        sys.exit(130)
    except (typer.Exit, SystemExit) as exc:
        sys.exit(getattr(exc, "exit_code", getattr(exc, "code", 0)))
    except Exception as exc:  # click usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(2)
        if distributed.world().distributed and distributed.is_peer_loss(exc):
            # Another process failed first: its own error is the one torchrun (and --nproc) reports.
            console.print(f"[red]stopped{_rank_tag()}:[/] another process of the build went away "
                          f"({type(exc).__name__}).", highlight=False)
            sys.exit(1)
        distributed.record_failure(exc)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            console.print(f"[bold red]error{_rank_tag()}:[/] the disk is full ({exc}). Nothing half-written was kept "
                          "in the cache; free some space and run the same command again.", highlight=False)
            sys.exit(1)
        raise


def _rank_tag() -> str:
    from .distributed import world

    w = world()
    return f" (rank {w.rank} of {w.size})" if w.distributed else ""


if __name__ == "__main__":
    main()
