"""Stage `search`: find the student. Candidates from the search space are distilled from the cached teacher on a
short proxy schedule (successive halving stops weak ones early), the survivors' artifacts are measured (exact figures
first: INT8 size, and with the MCU budgets the TFLite Micro arena and flash; then p99 on search.latency.target), the
best within budget get the full schedule, and the winner's spec goes to distill, which trains it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from ..data.for_config import subtask_data
from ..distill.train import distill, student_view
from ..errors import BudgetError
from ..models import count_macs, count_params, create_model
from ..search import choose
from ..search.config import SearchConfig
from ..search.measure import export_int8, export_tflite, preprocess_spec, tflm_figures
from ..search.space import Candidate, check_families
from ..search.study import FULL, PROXY, Worker, open_study, storage_for
from ..search.timing import Records, Timed, Timer
from ..seeds import seed_everything, seed_for
from ..stage import Stage, StageContext
from ..validation.targets import parse_target, timed_label
from .distill import CHOSEN, DistillStage, candidate_config


class SearchStage(Stage):
    name = "search"
    sections = ("search", "student", "distill", "subtask", "data", "build")
    packages = ("torch", "timm", "nncf", "onnx", "onnxruntime", "optuna")

    def key_sections(self, cfg) -> dict:
        sections = DistillStage().key_sections(cfg)   # what every trial's distillation depends on
        return {**sections, "search": cfg.search.model_dump(mode="json"), "threads": cfg.section("validate").threads
                if cfg.section("validate") else 1}

    def inputs(self, cfg):
        return tuple(n for n in DistillStage().inputs(cfg) if n != self.name)

    def run(self, ctx: StageContext) -> dict:
        cfg: SearchConfig = ctx.config.search
        session = SearchSession(ctx)
        trials, study_dir, proxy, full = session.trials, session.folder, session.proxy, session.full
        warn_small_validation(ctx, len(trials.data.val))
        trained = session.worker.run(proxy)
        rows = choose.current(choose.rows_of(proxy.get_trials(), full.get_trials()), cfg.budgets)
        trials.tflite_figures(rows)          # exact figures decide before anything is timed
        trials.first_round(rows)
        finalists = choose.finalists(rows, cfg.budgets, cfg.finalists, cfg.latency.rounds, cfg.latency.margin,
                                     trials.time_rows)
        for row in finalists:
            if row.full_val_acc is None:
                row.full_val_acc = trials.full_schedule(full, row)
        winner = choose.choice(rows, cfg.budgets)
        self.write(ctx.out, rows, finalists, winner, cfg, trials.timer)
        if winner is None:
            raise no_candidate_error(rows, cfg, study_dir)
        ctx.log(f"  search: chose {winner.candidate.label} (full-schedule val acc {winner.full_val_acc:.4f}, "
                f"{winner.macs / 1e6:.2f} M MACs, p99 {winner.p99:.3f} ms on {timed_label(cfg.latency.target)})")
        return {"chosen": winner.candidate.to_json(), "trials": len(rows), "trained_now": trained,
                "finalists": [r.candidate.label for r in finalists], "chosen_full_val_acc": winner.full_val_acc,
                "chosen_macs": winner.macs, "chosen_params": winner.params, "chosen_p99_ms": winner.p99,
                "chosen_size_kb": winner.size_kb, "chosen_arena_kb": winner.arena_kb,
                "chosen_flash_kb": winner.flash_kb, "latency_target": cfg.latency.target, **trials.times()}

    def write(self, out: Path, rows, finalists, winner, cfg: SearchConfig, timer: Timer) -> None:
        table = [{**r.to_json(), "finalist": r in finalists, "misses": choose.misses(r, cfg.budgets)} for r in rows]
        (out / "trials.json").write_text(json.dumps(table, indent=2) + "\n")
        # Which machine timed the candidates, and how: the figures mean nothing without it.
        timing = {**timer.protocol, "emulated": timer.target.emulated, "environment": timer.environment}
        (out / "timing.json").write_text(json.dumps(timing, indent=2) + "\n")
        choose.write_fronts(rows, out)
        if winner is not None:
            (out / CHOSEN).write_text(json.dumps({**winner.candidate.to_json(), "trial": winner.trial,
                                                  "why": why_chosen(winner, finalists, cfg),
                                                  "latency_target": cfg.latency.target, **winner.to_json()},
                                                 indent=2) + "\n")


# Below this many validation images one image moves the score by a quarter of a point or more, and candidates tie.
SMALL_VALIDATION = 400


def warn_small_validation(ctx: StageContext, images: int) -> None:
    if images < SMALL_VALIDATION:
        ctx.log(f"  search: warning: the validation split has {images} images (one image = {100 / images:.1f} "
                "points), too few to rank students reliably; label more validation images or keep a named "
                "student.arch (docs/search.md, 'Under a label budget')")


def why_chosen(winner, finalists, cfg: SearchConfig) -> str:
    budgets = ", ".join(f"{k} {v}" for k, v in cfg.budgets.set().items()) or "none set"
    figures = [f"p99 {winner.p99:.4g} ms on {timed_label(cfg.latency.target)}"] if winner.p99 is not None else []
    figures += [f"{name} {value:.1f} KiB" for name, value in (("arena", winner.arena_kb), ("flash", winner.flash_kb))
                if value is not None]
    return (f"best full-schedule validation accuracy ({winner.full_val_acc:.4f}) among the {len(finalists)} "
            f"finalists that meet every budget ({budgets}); {', '.join(figures) or 'no measured figure'}")


class SearchSession:
    """The study of a build's search (its folder, storage, proxy and full-schedule studies) and a worker for it:
    what the stage and `edgesmith search` workers share."""

    def __init__(self, ctx: StageContext):
        cfg = ctx.config.search
        check_families(cfg.families)
        self.key = study_key(ctx)
        # Next to the stage folders, so that it outlives a killed run (whose staging folder is thrown away).
        self.folder = Path(ctx.config.build.output) / ctx.config.build.name / "search-study" / self.key[:16]
        (self.folder / "artifacts").mkdir(parents=True, exist_ok=True)
        storage = storage_for(cfg, self.folder)
        self.proxy, self.full = open_study(storage, self.key, PROXY), open_study(storage, self.key, FULL)
        self.trials = TrialRunner(ctx, self.folder)
        self.worker = Worker(cfg, self.trials, self.folder / "artifacts", seed_for(ctx.config, "search.sampler"),
                             storage, ctx.log)


# The code a trial runs: a change there starts a new study; a change elsewhere (reports, release) keeps it.
TRIAL_CODE = ("pipeline/data", "pipeline/models", "pipeline/distill", "pipeline/ood", "pipeline/search",
              "pipeline/stages/distill.py", "pipeline/stages/search.py", "quantize", "exporters", "device_tests")


def study_key(ctx: StageContext) -> str:
    """Everything the trials depend on, without budgets, counts or storage: a changed budget reuses them."""
    from ..cache import code_digest, config_sha256

    sections = DistillStage().key_sections(ctx.config)
    inputs = {n: r.key for n, r in ctx.inputs.items()}
    return config_sha256({"study": ctx.config.search.study_fields(), "distill": sections, "inputs": inputs,
                          "code": code_digest(TRIAL_CODE)})


def no_candidate_error(rows, cfg: SearchConfig, study_dir: Path) -> BudgetError:
    lines = [f"{r.candidate.label}: {choose.why_not(r, m)}" for r, m in choose.closest(rows, cfg.budgets)]
    return BudgetError(
        f"No searched student meets the budgets ({len(rows)} candidates tried). Closest: " + " | ".join(lines),
        f"Relax search.budgets (the stored trials in {study_dir} are re-scored, nothing is trained again), or widen "
        "the space and raise search.trials to try more candidates.")


class TrialRunner:
    """The build's side of a trial: the distill stage's own recipe with the candidate as student, and the
    measurements of the survivors' artifacts."""

    def __init__(self, ctx: StageContext, folder: Path):
        self.ctx, self.folder = ctx, folder       # folder: the study's (its artifacts and measurement records)
        self.data = subtask_data(ctx.config)
        validate = ctx.config.section("validate")
        self.threads = validate.threads if validate else 1
        rng = np.random.default_rng(seed_for(ctx.config, "search.calibration"))
        self.calibration = self.data.train.images[np.sort(rng.permutation(len(self.data.train))[:200])]
        latency = ctx.config.search.latency
        self.timer = Timer(parse_target(latency.target), self.threads, latency, self.data.val.images[:64], validate)
        self.seconds = {"train_s": 0.0, "measure_s": 0.0, "tflite_s": 0.0, "timing_s": 0.0}
        self.converted = 0

    def complexity(self, candidate: Candidate) -> tuple[int, int]:
        model = self.model(candidate)
        view = self.view(candidate)
        return count_macs(model, (view.channels, view.size, view.size)), count_params(model)

    def model(self, candidate: Candidate):
        """An untrained candidate, built as the distill stage builds its student."""
        return create_model(candidate.arch, self.data.num_classes, self.view(candidate).channels)

    def view(self, candidate: Candidate):
        return student_view(candidate_config(self.ctx.config, candidate), self.data.dataset)

    def train(self, candidate: Candidate, epochs: int, on_epoch=None):
        import time

        start = time.perf_counter()
        cfg = candidate_config(self.ctx.config, candidate, epochs)
        seed_everything(seed_for(cfg, "global"), cfg.build.threads)   # as the distill stage starts: same init
        stage = DistillStage()
        try:
            run = stage.prepare(replace(self.ctx, config=cfg))
            result = distill(run.models, run.method, run.train, run.data.val, replace(run.settings, on_epoch=on_epoch))
        finally:
            self.seconds["train_s"] += time.perf_counter() - start
        return run.models.student, result["best_val_acc"]

    def artifact(self, candidate: Candidate, model, path: Path) -> Path:
        import time

        start = time.perf_counter()
        tmp = path.with_suffix(".partial")
        export_int8(model, self.view(candidate), self.calibration, tmp)
        tmp.replace(path)
        self.seconds["measure_s"] += time.perf_counter() - start
        return path

    def weights(self, model, path: Path) -> Path:
        import torch

        tmp = path.with_suffix(".partial")
        torch.save(model.state_dict(), tmp)
        tmp.replace(path)
        return path

    # -- measurements of the survivors (the stage's, after the proxy round) ---------------------------------
    def tflite_figures(self, rows) -> None:
        """With max_arena_kb / max_flash_kb: each survivor within the other exact budgets gets its INT8 .tflite
        (the tflm format's conversion) and TFLite Micro's arena and flash; kept in the study's tflite.json."""
        budgets = self.ctx.config.search.budgets
        if not budgets.needs_tflite:
            return
        from device_tests.measure import write_json

        path = self.folder / "tflite.json"
        records = json.loads(path.read_text()) if path.is_file() else {}
        for row in rows:
            if row.state != "complete" or not row.artifact or choose.misses(row, budgets, final=False):
                continue
            if row.artifact not in records:
                records[row.artifact] = self._tflite(row, self.folder / "artifacts")
                write_json(path, records)
            record = records[row.artifact]
            row.arena_kb, row.flash_kb = record.get("arena_kb"), record.get("flash_kb")
            row.tflite_s, row.tflite_error = record.get("tflite_s"), record.get("error", "")

    def _tflite(self, row, artifacts: Path) -> dict:
        import time

        import torch

        from device_tests.errors import DeviceTestError
        from exporters.errors import ExportError

        if not row.weights or not (artifacts / row.weights).is_file():
            return {"error": "the trial's weights are not stored"}
        start = time.perf_counter()
        model = self.model(row.candidate)
        model.load_state_dict(torch.load(artifacts / row.weights, map_location="cpu", weights_only=True))
        path = artifacts / row.artifact.replace(".int8.onnx", ".int8.tflite")
        try:
            export_tflite(model, self.view(row.candidate), self.calibration, path)
            record = tflm_figures(path)
        except (ExportError, DeviceTestError, RuntimeError) as exc:   # one candidate the converter or TFLM cannot take
            return {"error": getattr(exc, "message", str(exc))}
        seconds = time.perf_counter() - start
        self.seconds["tflite_s"] += seconds
        self.converted += 1
        self.ctx.log(f"  search: {row.candidate.label} as TFLite Micro INT8: arena {record['arena_kb']:.1f} KiB, "
                     f"flash {record['flash_kb']:.1f} KiB ({seconds:.1f} s)")
        return {**record, "tflite": path.name, "tflite_s": round(seconds, 2)}

    def first_round(self, rows) -> None:
        """The first p99 of every survivor within the exact budgets: from the records of this target and protocol,
        the others timed in one round (one connection to a remote target) and recorded."""
        budgets = self.ctx.config.search.budgets
        records: Records = self.timer.records(self.folder)
        due = []
        for row in rows:
            if row.state != "complete" or not row.artifact or choose.misses(row, budgets, final=False):
                continue
            known = records.get(row.artifact)
            if known is None:
                due.append(row)
            else:
                row.p99_ms, row.timed_on = [known], self.timer.target.spec
        if due:
            self.ctx.log(f"  search: timing {len(due)} candidate(s) on {timed_label(self.timer.target.spec)}")
            figures = self.time_rows(due)
            for row, value in zip(due, figures):
                row.p99_ms = [value]
            records.add({row.artifact: value for row, value in zip(due, figures)}, self.timer.environment)

    def time_rows(self, rows) -> list[float]:
        """One measuring round over `rows` on search.latency.target: their p99 (ms), in order."""
        import time

        start = time.perf_counter()
        models = [Timed(self.folder / "artifacts" / row.artifact, preprocess_spec(self.view(row.candidate)))
                  for row in rows]
        figures = self.timer(models)
        for row in rows:
            row.timed_on = self.timer.target.spec
        self.seconds["timing_s"] += time.perf_counter() - start
        return figures

    def full_schedule(self, study, row) -> float:
        """The finalist trained with the config's whole distill schedule, recorded in the study of full runs."""
        trial = study.ask()
        trial.set_user_attr("candidate", row.candidate.to_json())
        trial.set_user_attr("proxy_trial", row.trial)
        self.ctx.log(f"  search finalist {row.candidate.label}: full schedule ({self.ctx.config.distill.epochs} epochs)")
        _, best = self.train(row.candidate, self.ctx.config.distill.epochs)
        study.tell(trial, best)
        return best

    def times(self) -> dict:
        times = {k: round(v, 1) for k, v in self.seconds.items()}
        if self.converted:
            times["tflite_s_per_candidate"] = round(self.seconds["tflite_s"] / self.converted, 2)
        return times


def work(ctx: StageContext) -> int:
    """`edgesmith search`: one more worker on the build's study (no build lock: Optuna's storage keeps the workers
    apart). Returns the trials it trained."""
    session = SearchSession(ctx)
    ctx.log(f"search worker on {session.folder} ({ctx.config.search.trials} trials wanted)")
    return session.worker.run(session.proxy)
