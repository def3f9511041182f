"""The default build's unknown answer, per artifact: the real distill, qat, export and validate stages of a
config (default configs/fashion_tops.yaml with its `ood:` block) run on an already built adapt/ folder, so the
slow EfficientNet adaptation is not repeated (any code change gives the adapt stage a new cache key).

    flock /work/cpu.lock nice -n 10 .venv/bin/python bench/ood_build.py --adapt builds/fashion_tops/adapt-<key>
Prints the build-side (PyTorch, export stage) and device-side (validate stage, every artifact x runtime) OOD
figures and writes bench/results/ood_build.json. The stage folders go to builds/ood_build/.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

from rich.console import Console

from pipeline.config import load_config, parse_config
from pipeline.progress import ProgressDisplay
from pipeline.runner import run_stage

STAGE_NAMES = ("distill", "qat", "export", "validate")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "fashion_tops.yaml")
    p.add_argument("--adapt", type=Path, required=True)
    p.add_argument("--work", type=Path, default=ROOT / "builds" / "ood_build")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "ood_build.json")
    p.add_argument("--train-per-class", type=int, default=None, help="cap (data.train_per_class) for a shorter run")
    p.add_argument("--epochs", type=int, default=None, help="override distill.epochs for a shorter run")
    args = p.parse_args(argv)
    cfg = load_config(args.config)
    if args.train_per_class or args.epochs:
        raw = cfg.dump()
        if args.train_per_class:
            raw["data"]["train_per_class"] = args.train_per_class
        if args.epochs:
            raw["distill"]["epochs"] = args.epochs
        cfg = parse_config(raw, f"{args.config} (shortened)")
    if cfg.ood is None:
        raise SystemExit(f"{args.config} has no ood section")
    progress = ProgressDisplay(Console(stderr=True), enabled=False)
    folders, metrics_of = {"adapt": args.adapt}, {}
    shutil.rmtree(args.work, ignore_errors=True)
    walls = {}
    for name in STAGE_NAMES:
        out = args.work / name
        start = time.perf_counter()
        metrics = run_stage(cfg, name, out, folders, progress)
        walls[name] = time.perf_counter() - start
        (out / "stage.json").write_text(json.dumps({"stage": name, "metrics": metrics}, indent=1, default=float))
        folders[name], metrics_of[name] = out, metrics
        print(f"{name}: done in {walls[name]:.0f} s", flush=True)
    export_ood = metrics_of["export"]["ood"]
    runs = json.loads((args.work / "validate" / "results-local.json").read_text())["runs"]
    device = [{"artifact": r["artifact"], "runtime": r["runtime"], "precision": r["precision"],
               "top1": r.get("accuracy", {}).get("top1"), **{k: v for k, v in r.get("ood", {}).items() if k != "histogram"}}
              for r in runs if r.get("status") == "passed"]
    lines = [f"{'where':<34} {'threshold':>9} {'AUROC':>7} {'FPR@95':>7} {'in kept':>8} {'out acc.':>8} "
             f"{'top-1 all':>9} {'top-1 kept':>10} {'unknown':>8}"]
    for name in ("fp32", "int8", "int8_with_fp32_threshold"):
        if name in export_ood:
            m = export_ood[name]
            lines.append(f"{'torch ' + name:<34} {m['threshold']:>9.4f} {m['auroc']:>7.4f} {m['fpr95']:>7.4f} "
                         f"{m['tpr_at_threshold']:>8.4f} {m['fpr_at_threshold']:>8.4f} {m['accuracy_all']:>9.4f} "
                         f"{m['accuracy_accepted']:>10.4f} {'':>8}")
    for d in device:
        lines.append(f"{d['artifact'] + ' (' + d['runtime'] + ')':<34} {d['threshold']:>9.4f} {d['auroc']:>7.4f} "
                     f"{d['fpr95']:>7.4f} {d['tpr_at_threshold']:>8.4f} {d['fpr_at_threshold']:>8.4f} "
                     f"{d['accuracy_all']:>9.4f} {d['accuracy_accepted']:>10.4f} {d['unknown_predictions']:>8}")
    text = "\n".join(lines)
    print(text)
    report = {"command": " ".join(["bench/ood_build.py", *(argv if argv is not None else sys.argv[1:])]),
              "config_ood": cfg.ood.model_dump(mode="json"), "adapt": str(args.adapt), "stage_wall_s": walls,
              "distill": {k: v for k, v in metrics_of["distill"].items() if k != "history"},
              "qat": {k: v for k, v in metrics_of["qat"].items() if "history" not in k},
              "export_ood": export_ood, "device": device,
              "validate_passed": metrics_of["validate"].get("passed"),
              "budgets": metrics_of["validate"].get("budgets"), "table": text}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, default=float) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
