"""Stage `search`: find the student. Candidates from the search space are distilled from the cached teacher on a
short proxy schedule (successive halving stops weak ones early), the survivors' INT8 artifacts are measured here,
the best within budget get the full schedule, and the winner's spec goes to distill, which trains it."""

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
from ..search.measure import export_int8, p99_ms
from ..search.space import Candidate, check_families
from ..search.study import FULL, PROXY, Worker, open_study, storage_for
from ..seeds import seed_everything, seed_for
from ..stage import Stage, StageContext
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
        trained = session.worker.run(proxy)
        rows = choose.current(choose.rows_of(proxy.get_trials(), full.get_trials()), cfg.budgets)
        finalists = choose.finalists(rows, cfg.budgets, cfg.finalists, cfg.latency.rounds, cfg.latency.margin,
                                     lambda row: trials.p99_ms(row.candidate, study_dir / "artifacts" / row.artifact))
        for row in finalists:
            if row.full_val_acc is None:
                row.full_val_acc = trials.full_schedule(full, row)
        winner = choose.choice(rows, cfg.budgets)
        self.write(ctx.out, rows, finalists, winner, cfg)
        if winner is None:
            raise no_candidate_error(rows, cfg, study_dir)
        ctx.log(f"  search: chose {winner.candidate.label} (full-schedule val acc {winner.full_val_acc:.4f}, "
                f"{winner.macs / 1e6:.2f} M MACs, p99 {winner.p99:.3f} ms)")
        return {"chosen": winner.candidate.to_json(), "trials": len(rows), "trained_now": trained,
                "finalists": [r.candidate.label for r in finalists], "chosen_full_val_acc": winner.full_val_acc,
                "chosen_macs": winner.macs, "chosen_params": winner.params, "chosen_p99_ms": winner.p99,
                "chosen_size_kb": winner.size_kb, **trials.times()}

    def write(self, out: Path, rows, finalists, winner, cfg: SearchConfig) -> None:
        table = [{**r.to_json(), "finalist": r in finalists, "misses": choose.misses(r, cfg.budgets)} for r in rows]
        (out / "trials.json").write_text(json.dumps(table, indent=2) + "\n")
        choose.write_fronts(rows, out)
        if winner is not None:
            budgets = ", ".join(f"{k} {v}" for k, v in cfg.budgets.set().items()) or "none set"
            why = (f"best full-schedule validation accuracy ({winner.full_val_acc:.4f}) among the {len(finalists)} "
                   f"finalists that meet every budget ({budgets})")
            (out / CHOSEN).write_text(json.dumps({**winner.candidate.to_json(), "trial": winner.trial, "why": why,
                                                  **winner.to_json()}, indent=2) + "\n")


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
        self.trials = TrialRunner(ctx)
        self.worker = Worker(cfg, self.trials, self.folder / "artifacts", seed_for(ctx.config, "search.sampler"),
                             ctx.log)


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
    """The build's side of a trial: the distill stage's own recipe with the candidate as student."""

    def __init__(self, ctx: StageContext):
        self.ctx = ctx
        self.data = subtask_data(ctx.config)
        self.threads = ctx.config.section("validate").threads if ctx.config.section("validate") else 1
        rng = np.random.default_rng(seed_for(ctx.config, "search.calibration"))
        self.calibration = self.data.train.images[np.sort(rng.permutation(len(self.data.train))[:200])]
        self.timing_images = self.data.val.images[:64]
        self.seconds = {"train_s": 0.0, "measure_s": 0.0}

    def complexity(self, candidate: Candidate) -> tuple[int, int]:
        view = self.view(candidate)
        model = create_model(candidate.arch, self.data.num_classes, view.channels)
        return count_macs(model, (view.channels, view.size, view.size)), count_params(model)

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

    def p99_ms(self, candidate: Candidate, path: Path) -> float:
        import time

        start = time.perf_counter()
        value = p99_ms(path, self.view(candidate), self.timing_images, self.threads, self.ctx.config.search.latency)
        self.seconds["measure_s"] += time.perf_counter() - start
        return value

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
        return {k: round(v, 1) for k, v in self.seconds.items()}


def work(ctx: StageContext) -> int:
    """`edgesmith search`: one more worker on the build's study (no build lock: Optuna's storage keeps the workers
    apart). Returns the trials it trained."""
    session = SearchSession(ctx)
    ctx.log(f"search worker on {session.folder} ({ctx.config.search.trials} trials wanted)")
    return session.worker.run(session.proxy)
