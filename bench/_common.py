"""What every benchmark shares: the config files it varies, its arguments (--quick, --out) and the provenance
stamp on every results file, so that the commit, machine and command behind a figure can be read from the file.

Benchmarks vary a config with `pipeline.config.config_with(base, {"dotted.key": value})`, never by editing YAML
dicts, so the config's own checks (unknown or retired keys) apply to every variant.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DEFAULT_CONFIG = ROOT / "configs" / "fashion_tops.yaml"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
# A results file is stale when any of these differ from its commit, so the dirty flag covers all of them.
MEASURED_PATHS = ("pipeline", "quantize", "exporters", "device_tests", "bench", "configs", "pyproject.toml",
                  "constraints.txt")


# -- arguments ---------------------------------------------------------------------------------------------------

def parser(name: str, doc: str, results: str | None = None) -> argparse.ArgumentParser:
    """The bench's parser with the shared --quick and --out. `results` is the default results file's name in
    bench/results (default: NAME.json); a --quick run writes NAME_quick.json so it never replaces real results."""
    summary, _, details = doc.strip().partition("\n")
    p = argparse.ArgumentParser(prog=f"python -m bench {name}", description=summary, epilog=details.strip() or None,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.set_defaults(bench=name, results_name=results or f"{name}.json")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, minutes on 2 cores")
    p.add_argument("--out", type=Path, default=None,
                   help=f"results file (default bench/results/{results or name + '.json'}; with --quick *_quick.json)")
    return p


def parse(p: argparse.ArgumentParser, argv: Optional[Sequence[str]] = None,
          results_for: Optional[Callable[[argparse.Namespace], str]] = None) -> argparse.Namespace:
    """Parsed arguments plus `command` (the exact command line, for the provenance stamp) and a resolved --out;
    `results_for(args)`, if given, names the default results file of a bench whose modes write different files."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    args.command = shlex.join(["python", "-m", "bench", args.bench, *argv])
    if args.out is None:
        args.out = default_out(results_for(args) if results_for else args.results_name, args.quick)
    return args


def default_out(results_name: str, quick: bool) -> Path:
    path = RESULTS / results_name
    return path.with_name(f"{path.stem}_quick{path.suffix}") if quick else path


def settings(args: argparse.Namespace) -> dict:
    """The arguments as JSON values, for the results file (the command line is in the provenance stamp); paths in
    the repository relative to it, so that a results file does not depend on where the clone lives."""
    return {k: _repo_relative(v) for k, v in vars(args).items() if k not in ("command", "bench", "results_name")}


def _repo_relative(value):
    if isinstance(value, (str, Path)) and Path(value).is_absolute() and Path(value).is_relative_to(ROOT):
        return str(Path(value).relative_to(ROOT))
    return str(value) if isinstance(value, Path) else value


# -- provenance --------------------------------------------------------------------------------------------------

def provenance(command: str) -> dict:
    """Commit and dirty flag, machine, versions, the command and the UTC time of a run."""
    import torch

    from pipeline.release.manifest import git_state, host_info

    state = git_state(ROOT, MEASURED_PATHS)
    return {"git_commit": state.git_commit, "git_dirty": state.git_dirty, **host_info().model_dump(),
            "torch": torch.__version__, "command": command,
            "utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def stamp_line(stamp: dict) -> str:
    """The stamp as one header line for a text table."""
    dirty = {True: " (uncommitted changes)", False: "", "unknown": " (changes unknown)"}.get(stamp["git_dirty"], "")
    return (f"# commit {stamp['git_commit'][:12]}{dirty} | {stamp['cpu']}, {stamp['cores']} cores, "
            f"python {stamp['python']}, torch {stamp['torch']} | {stamp['utc']} | {stamp['command']}")


# -- writing results ---------------------------------------------------------------------------------------------

def write_results(path: Path, report: dict, command: str, table: str | None = None) -> dict:
    """The report as JSON at `path`, its provenance stamp first; `table`, if given, next to it as .txt under a
    header line with the same stamp. Returns the stamp (for figures and merged files)."""
    stamp = provenance(command)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {k: v for k, v in report.items() if k != "provenance"}     # a merged report's old stamp: replaced
    path.write_text(json.dumps({"provenance": stamp, **body}, indent=1, default=_json_value) + "\n")
    if table is not None:
        path.with_suffix(".txt").write_text(stamp_line(stamp) + "\n" + table + "\n")
    return stamp


def save_figure(fig: Any, path: Path, stamp: dict, dpi: int = 110) -> None:
    """A matplotlib figure as PNG, the stamp line in its metadata (the JSON twin holds the full stamp)."""
    fig.savefig(path, dpi=dpi, metadata={"Description": stamp_line(stamp)})


def _json_value(value: Any) -> Any:
    """numpy and torch values as Python ones; anything else JSON lacks (paths, dtypes) as text."""
    to_python = getattr(value, "tolist", None)
    return to_python() if callable(to_python) else str(value)


def quiet_progress():
    """A progress display that prints nothing: benchmarks print their own lines."""
    from rich.console import Console

    from pipeline.progress import ProgressDisplay

    return ProgressDisplay(Console(quiet=True), enabled=False)
