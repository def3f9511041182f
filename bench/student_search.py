"""Which student does the search find, and what does it cost? A search under a MACs budget and one under a latency
budget, on a config's teacher, beside the config's hand-picked student.

1. The config with `student.arch: search` and search.budgets.max_macs = teacher MACs / --mac-reduction: the search
   stage, then distill trains the choice with the full recipe. Reported: the choice's test accuracy and MACs next
   to the config's own student, the search's wall time and its share spent training vs measuring, and the Spearman
   rank correlation of proxy and full-schedule validation accuracy over the finalists (--finalists of them).
2. The same search with search.budgets.max_p99_ms = --latency-fraction x the p99 of the config's student's INT8 ONNX
   (ONNX Runtime, 1 thread): the stored trials are re-scored, new finalists trained. Both students' INT8 ONNX files
   are then timed in alternating rounds in this process, so that both figures come from one run.

    python -m bench student_search                                   # the default config
    python -m bench student_search --config configs/fashion_tops_50labels.yaml --finalists 3 --skip-latency
    python -m bench student_search --quick                           # configs/tiny.yaml, a few trials
Writes bench/results/student_search.{json,txt,png} (another --config: student_search_<build name>.*).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench._common import DEFAULT_CONFIG, ROOT, TINY_CONFIG, parse, parser, quiet_progress, save_figure, settings, write_results
from pipeline.config import config_with
from pipeline.errors import BudgetError
from pipeline.runner import Build


def parse_args(argv=None):
    p = parser("student_search", __doc__)
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p.add_argument("--trials", type=int, default=24)
    p.add_argument("--epochs", type=int, default=4, help="proxy schedule (search.epochs)")
    p.add_argument("--finalists", type=int, default=8)
    p.add_argument("--mac-reduction", type=float, default=20.0, help="max_macs = teacher MACs / this")
    p.add_argument("--latency-fraction", type=float, default=0.5, help="max_p99_ms = this x the config student's p99")
    p.add_argument("--latency-finalists", type=int, default=3, help="finalists of the latency-budget search")
    p.add_argument("--skip-latency", action="store_true", help="only the MACs-budget search")
    p.add_argument("--rounds", type=int, default=7, help="alternating timing rounds of the two INT8 students")

    def results_for(args):
        return "student_search.json" if args.config == DEFAULT_CONFIG else f"student_search_{args.config.stem}.json"

    return parse(p, argv, results_for)


def search_config(args, budgets: dict, finalists: int):
    base = TINY_CONFIG if args.quick else args.config
    search = {"trials": 4 if args.quick else args.trials, "epochs": 2 if args.quick else args.epochs,
              "finalists": min(finalists, 3) if args.quick else finalists, "budgets": budgets}
    if args.quick:
        search["families"] = [{"family": "cnn", "blocks": [2, 3], "widths": [4, 8], "downsamples": [1, 2],
                               "resolutions": [20, 28]}]
    return config_with(base, {"student.arch": "search", "search": search}, remove=("qat", "export", "validate", "release"))


def build(cfg) -> dict:
    """The build up to distill; per stage: metrics, wall time, folder."""
    summary = Build(cfg).run(quiet_progress(), until="distill")
    return {row["stage"]: row for row in summary}


def spearman(xs: list[float], ys: list[float]) -> float | None:
    from scipy.stats import spearmanr

    return float(spearmanr(xs, ys).statistic) if len(xs) >= 3 else None


def search_summary(stages: dict) -> dict:
    import json

    search, distill = stages["search"], stages["distill"]
    folder = Path(search["dir"])
    rows = json.loads((folder / "trials.json").read_text())
    both = [r for r in rows if r["full_val_acc"] is not None and r["proxy_val_acc"] is not None]
    m = search["metrics"]
    return {"chosen": m["chosen"], "chosen_macs": m["chosen_macs"], "chosen_params": m["chosen_params"],
            "chosen_p99_ms": m["chosen_p99_ms"], "chosen_full_val_acc": m["chosen_full_val_acc"],
            "student_test_acc": distill["metrics"]["student_test_acc"], "teacher_macs": distill["metrics"]["teacher_macs"],
            "search_wall_s": search["wall_s"], "search_cached": search["cached"], "train_s": m["train_s"],
            "measure_s": m["measure_s"], "trials": m["trials"], "trained_now": m["trained_now"],
            "proxy_vs_full": [{"candidate": f"{r['arch']}@{r['resolution']}", "proxy": r["proxy_val_acc"],
                               "full": r["full_val_acc"]} for r in both],
            "spearman_proxy_full": spearman([r["proxy_val_acc"] for r in both], [r["full_val_acc"] for r in both]),
            "p99_noise": [r["p99_noise"] for r in rows if r.get("p99_noise") is not None],
            "rows": rows, "folder": str(folder), "distill_dir": distill["dir"]}


def int8_of(distill_dir: str, path: Path) -> Path:
    """The distilled student's INT8 ONNX as the search scores candidates (same export and PTQ)."""
    import numpy as np

    from pipeline.models import load_student
    from pipeline.search.measure import export_int8

    model, spec = load_student(Path(distill_dir))
    calibration = np.random.default_rng(0).integers(0, 256, (64, spec.input.channels, 28, 28), dtype=np.uint8)
    return export_int8(model, spec.input, calibration, path)


def alternating_p99(paths: dict[str, Path], views: dict, rounds: int) -> dict[str, list[float]]:
    import numpy as np

    from pipeline.search.config import SearchLatency
    from pipeline.search.measure import p99_ms

    images = np.random.default_rng(1).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
    protocol = SearchLatency(min_queries=1024, min_duration_s=2.0, warmup=50)
    out = {name: [] for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            out[name].append(p99_ms(path, views[name], images, 1, protocol))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from pipeline.models import load_student

    base = config_with(TINY_CONFIG if args.quick else args.config, {},
                       remove=("qat", "export", "validate", "release"))
    own = build(base)["distill"]["metrics"]
    # The tiny config's teacher is itself tiny: a twentieth of it leaves nothing to search.
    max_macs = int(own["teacher_macs"] / args.mac_reduction) if not args.quick else 60000
    start = time.perf_counter()
    by_macs = search_summary(build(search_config(args, {"max_macs": max_macs}, args.finalists)))
    by_macs["build_wall_s"] = time.perf_counter() - start
    config = TINY_CONFIG if args.quick else args.config.resolve()
    report = {"config": str(config.relative_to(ROOT) if config.is_relative_to(ROOT) else config), "own_student": {
        "arch": base.student.arch, "test_acc": own["student_test_acc"], "macs": own["student_macs"],
        "params": own["student_params"]}, "max_macs": max_macs, "by_macs": by_macs, "settings": settings(args)}
    if not args.skip_latency:
        with tempfile.TemporaryDirectory() as tmp:
            own_dir = build(base)["distill"]["dir"]
            own_onnx = int8_of(own_dir, Path(tmp) / "own.int8.onnx")
            own_view = load_student(Path(own_dir))[1].input
            own_p99 = statistics.median(alternating_p99({"own": own_onnx}, {"own": own_view}, 3)["own"])
            budget = args.latency_fraction * own_p99
            try:
                by_latency = search_summary(build(search_config(
                    args, {"max_p99_ms": round(budget, 6)}, args.latency_finalists)))
            except BudgetError as exc:      # a result too: no candidate of the space is that fast
                report["by_latency"] = {"max_p99_ms": budget, "own_p99_ms": own_p99, "none_met": exc.message}
                return finish(args, report)
            chosen_onnx = int8_of(by_latency["distill_dir"], Path(tmp) / "chosen.int8.onnx")
            chosen_view = load_student(Path(by_latency["distill_dir"]))[1].input
            timed = alternating_p99({"own": own_onnx, "chosen": chosen_onnx}, {"own": own_view, "chosen": chosen_view},
                                    args.rounds)
        by_latency.update(max_p99_ms=budget, own_p99_rounds_ms=timed["own"], chosen_p99_rounds_ms=timed["chosen"],
                          own_p99_ms=statistics.median(timed["own"]), chosen_p99_final_ms=statistics.median(timed["chosen"]))
        report["by_latency"] = by_latency
    return finish(args, report)


def finish(args, report: dict) -> int:
    table = format_table(report)
    print(table)
    stamp = write_results(args.out, report, args.command, table)
    plot(report, args.out.with_suffix(".png"), stamp)
    return 0


def format_table(report: dict) -> str:
    own, m = report["own_student"], report["by_macs"]
    lines = [f"config {report['config']}: own student {own['arch']} test {own['test_acc']:.4f}, "
             f"{own['macs'] / 1e6:.2f} M MACs",
             "", "| search | chosen | MACs (M) | reduction vs teacher | p99 ms (search) | val (full) | test | "
             "search wall s | train s | measure s | trials (trained now) | Spearman proxy/full (n) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = [("max_macs " + f"{report['max_macs'] / 1e6:.2f} M", m)]
    if "chosen" in report.get("by_latency", {}):
        rows.append((f"max_p99_ms {report['by_latency']['max_p99_ms']:.4f}", report["by_latency"]))
    for name, s in rows:
        sp = s["spearman_proxy_full"]
        lines.append(f"| {name} | {s['chosen']['arch']}@{s['chosen']['resolution']} | {s['chosen_macs'] / 1e6:.3f} | "
                     f"{s['teacher_macs'] / s['chosen_macs']:.1f}x | {s['chosen_p99_ms']:.4f} | "
                     f"{s['chosen_full_val_acc']:.4f} | {s['student_test_acc']:.4f} | {s['search_wall_s']:.0f} | "
                     f"{s['train_s']:.0f} | {s['measure_s']:.0f} | {s['trials']} ({s['trained_now']}) | "
                     f"{'n/a' if sp is None else f'{sp:.3f}'} ({len(s['proxy_vs_full'])}) |")
    if "none_met" in report.get("by_latency", {}):
        lines += ["", f"max_p99_ms {report['by_latency']['max_p99_ms']:.4f} (own p99 "
                      f"{report['by_latency']['own_p99_ms']:.4f} ms): {report['by_latency']['none_met']}"]
    if "chosen_p99_final_ms" in report.get("by_latency", {}):
        lat = report["by_latency"]
        lines += ["", f"INT8 ONNX p99, 1 thread, alternating rounds: own {lat['own_p99_ms']:.4f} ms "
                      f"{[round(v, 4) for v in lat['own_p99_rounds_ms']]}, chosen {lat['chosen_p99_final_ms']:.4f} ms "
                      f"{[round(v, 4) for v in lat['chosen_p99_rounds_ms']]} "
                      f"(ratio {lat['chosen_p99_final_ms'] / lat['own_p99_ms']:.2f})"]
    lines += ["", "proxy vs full-schedule validation accuracy (MACs search): " +
              ", ".join(f"{r['candidate']} {r['proxy']:.4f}/{r['full']:.4f}" for r in m["proxy_vs_full"])]
    noise = m["p99_noise"]
    if noise:
        lines.append(f"p99 spread over rounds (max-min)/median: median {statistics.median(noise):.3f}, max {max(noise):.3f}")
    return "\n".join(lines)


def plot(report: dict, path: Path, stamp: dict) -> None:
    import matplotlib.pyplot as plt

    from pipeline.search import choose

    rows = [choose.Row.from_json(r) for r in report["by_macs"]["rows"]]
    fig = choose.fronts_figure(rows, choose.front_trials(rows))
    save_figure(fig, path, stamp)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
