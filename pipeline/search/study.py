"""The trials, kept in an Optuna study: a seeded TPE sampler draws candidates, MACs and parameters over budget are
skipped before any training, successive halving stops weak candidates after a few epochs, and every survivor keeps
its INT8 ONNX artifact and its weights (the stage measures them: choose.py, timing.py). The study lives in a journal
file (or an RDB) outside the stage folder, so a killed search resumes, several workers can share it, and a changed
budget re-scores the stored trials."""

from __future__ import annotations

import hashlib
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ..errors import ConfigError
from .config import SearchConfig
from .space import Candidate, space_size, suggest

PROXY = "proxy"          # study of the proxy round
FULL = "full"            # study of the finalists' full-schedule runs


class Evaluator(Protocol):
    """What a trial needs from the build: the candidate's size, a distillation run, its INT8 artifact and weights."""

    def complexity(self, candidate: Candidate) -> tuple[int, int]: ...            # (MACs, parameters)

    def train(self, candidate: Candidate, epochs: int, on_epoch: Callable[[int, float], None]) -> tuple[object, float]: ...

    def artifact(self, candidate: Candidate, model, path: Path) -> Path: ...

    def weights(self, model, path: Path) -> Path: ...


def check_optuna() -> None:
    """The search needs Optuna (the `search` extra)."""
    import importlib.util

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("The config has a search section, but Optuna is not installed.",
                          'Install the search extra: pip install -e ".[search]" (make demo / make test do it).')


def check_mcu_extra(cfg: SearchConfig) -> None:
    """search.budgets.max_arena_kb / max_flash_kb convert every candidate as the tflm format does, which needs the
    `mobile` extra (litert-torch, tflite-micro)."""
    if not cfg.budgets.needs_tflite:
        return
    from exporters.mobile import NEEDS, installed

    missing = [m for m in NEEDS["tflm"] if not installed(m)]
    if missing:
        named = " and ".join(k for k in ("max_arena_kb", "max_flash_kb") if getattr(cfg.budgets, k) is not None)
        raise ConfigError(f"search.budgets.{named} convert each candidate to TFLite Micro, but {', '.join(missing)} "
                          "(the `mobile` extra) is not installed in this Python.",
                          "Install it with `pip install -c constraints.txt -e '.[mobile]'` (`make venv` does), or "
                          "drop max_arena_kb / max_flash_kb from search.budgets.")


def storage_for(cfg: SearchConfig, folder: Path):
    """The Optuna storage: search.storage (a journal file or an RDB URL), else `folder`/journal.log."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    where = cfg.storage
    if where and "://" in where:
        try:
            return optuna.storages.RDBStorage(where)
        except Exception as exc:  # SQLAlchemy's errors vary by backend; all mean the URL cannot be opened
            raise ConfigError(f"search.storage {where!r} cannot be opened: {type(exc).__name__}: {exc}",
                              "Give a journal file path (shared folder) or a reachable SQLAlchemy database URL.") from None
    path = Path(where) if where else Path(folder) / "journal.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return JournalStorage(JournalFileBackend(str(path)))


def study_name(key: str, kind: str) -> str:
    return f"search-{key[:16]}-{kind}"


def open_study(storage, key: str, kind: str):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(storage=storage, study_name=study_name(key, kind), direction="maximize",
                               load_if_exists=True)


def ask_named(study, storage, worker: dict):
    """study.ask(), except that the trial names its worker in the storage write that creates it. Named in a second
    write, a trial whose worker was killed between the two stayed RUNNING without a name; a resume soon after
    counted it among the trials and drew other candidates than a search that ran straight through."""
    import optuna

    template = optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING, user_attrs={"worker": worker})
    trial_id = storage.create_new_trial(storage.get_study_id_from_name(study.study_name), template_trial=template)
    return optuna.Trial(study, trial_id)


def derived_seed(seed: int, index: int) -> int:
    return int.from_bytes(hashlib.sha256(f"search:{seed}:{index}".encode()).digest()[:4], "little")


@dataclass
class Worker:
    """Runs proxy trials until the study holds `cfg.trials` trained ones (its own and other workers')."""

    cfg: SearchConfig
    evaluator: Evaluator
    artifacts: Path
    seed: int
    storage: object                 # the study's Optuna storage (storage_for)
    log: Callable[[str], None] = print

    def run(self, study) -> int:
        """Trials this worker trained."""
        import optuna

        trained, draws = 0, 0
        while self._wanted(study) > 0 and draws < 20 * self.cfg.trials:
            fail_dead_trials(study)
            done = [t for t in study.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.FAIL]
            if len({_label(t) for t in done if _label(t)}) >= space_size(self.cfg.families):
                self.log("  search: every candidate of the space has been drawn")
                break
            # The sampler is seeded by the trial's place among the non-failed ones: a search killed and resumed
            # draws the same candidates as one that ran straight through.
            study.sampler = optuna.samplers.TPESampler(seed=derived_seed(self.seed, len(done)))
            study.pruner = successive_halving(self.cfg.reduction_factor, first_rung(self.cfg))
            draws += 1
            trained += self._one(study)
        return trained

    def _wanted(self, study) -> int:
        import optuna

        trials = study.get_trials(deepcopy=False)
        busy = [t for t in trials if t.state == optuna.trial.TrialState.RUNNING and t.user_attrs.get("training")]
        return self.cfg.trials - len([t for t in trials if t.user_attrs.get("trained")]) - len(busy)

    def _one(self, study) -> int:
        import optuna

        trial = ask_named(study, self.storage, {"host": socket.gethostname(), "pid": os.getpid()})
        candidate = suggest(trial, self.cfg.families)
        trial.set_user_attr("candidate", candidate.to_json())
        if _running_twin(study, candidate, trial.number):
            # Another worker is training this candidate now: wait for its result rather than train it twice (the
            # next draw, at the same position, draws it again and then copies the result).
            trial.set_user_attr("waited_for_twin", True)
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            time.sleep(2.0)
            return 0
        earlier = _trained_twin(study, candidate, trial.number)
        if earlier is not None:          # drawn before (another worker, or the sampler again): no second training
            for k, v in earlier.user_attrs.items():
                if k not in ("worker", "candidate"):
                    trial.set_user_attr(k, v)
            trial.set_user_attr("trained", False)
            trial.set_user_attr("twin_of", earlier.number)
            study.tell(trial, earlier.value if earlier.state == optuna.trial.TrialState.COMPLETE else None,
                       state=earlier.state)
            return 0
        macs, params = self.evaluator.complexity(candidate)
        trial.set_user_attr("macs", macs)
        trial.set_user_attr("params", params)
        over = self._over_budget(trial, macs, params)
        if over:
            trial.set_user_attr("skipped", over)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return 0
        self.log(f"  search trial {trial.number}: {candidate.label} ({macs / 1e6:.2f} M MACs, {params} params)")
        trial.set_user_attr("training", True)
        return self._train(study, trial, candidate)

    def _over_budget(self, trial, macs: int, params: int) -> str:
        budgets = self.cfg.budgets
        misses = []
        for name, value, limit in (("max_macs", macs, budgets.max_macs), ("max_params", params, budgets.max_params)):
            trial.set_constraint(name, 0.0 if limit is None else (value - limit) / limit)
            if limit is not None and value > limit:
                misses.append(f"{name} {value} > {limit}")
        return "; ".join(misses)

    def _train(self, study, trial, candidate: Candidate) -> int:
        import optuna

        history: list[float] = []

        def on_epoch(epoch: int, val_acc: float) -> None:
            history.append(val_acc)
            trial.set_user_attr("history", history)
            trial.report(val_acc, epoch)
            if trial.should_prune():
                raise optuna.TrialPruned()

        try:
            model, best = self.evaluator.train(candidate, self.cfg.epochs, on_epoch)
        except optuna.TrialPruned:
            trial.set_user_attr("trained", True)
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.log(f"    pruned after {len(history)} epoch(s) at val acc {history[-1]:.4f}")
            return 1
        path = self.evaluator.artifact(candidate, model, self.artifacts / f"trial{trial.number}.int8.onnx")
        size_kb = path.stat().st_size / 1024
        # The weights, for artifacts that a later budget may ask for (the .tflite of max_arena_kb) without training
        # again; timing is the stage's, on search.latency.target, so that workers busy training do not skew it.
        weights = self.evaluator.weights(model, self.artifacts / f"trial{trial.number}.pt")
        trial.set_user_attr("artifact", path.name)
        trial.set_user_attr("weights", weights.name)
        trial.set_user_attr("size_kb", size_kb)
        trial.set_user_attr("trained", True)
        study.tell(trial, best)
        self.log(f"    val acc {best:.4f}, INT8 {size_kb:.1f} KiB")
        return 1


def first_rung(cfg: SearchConfig) -> int:
    """Epochs every trial trains before the first cut: a 1/reduction_factor share of the proxy schedule. (A cut
    after one epoch, with another at reduction_factor epochs, left only a ninth of the trials to finish: too few
    finalists, chosen on one epoch's noise.)"""
    return max(1, math.ceil(cfg.epochs / cfg.reduction_factor))


def successive_halving(reduction_factor: int, min_resource: int):
    """Optuna's asynchronous successive halving, blind to FAILed trials: the rung values of a trial whose worker
    was killed do not count twice when its candidate is trained again."""
    import optuna

    class _WithoutFailed:
        def __init__(self, study):
            self._study = study

        def get_trials(self, deepcopy: bool = True, states=None):
            return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                    if t.state != optuna.trial.TrialState.FAIL]

        def __getattr__(self, name):
            return getattr(self._study, name)

    class Pruner(optuna.pruners.SuccessiveHalvingPruner):
        def prune(self, study, trial) -> bool:
            return super().prune(_WithoutFailed(study), trial)

    return Pruner(min_resource=min_resource, reduction_factor=reduction_factor)


def _label(trial) -> str | None:
    c = trial.user_attrs.get("candidate")
    return f"{c['arch']}@{c['resolution']}" if c else None


def _trained_twin(study, candidate: Candidate, number: int):
    import optuna

    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)):
        if t.number != number and t.user_attrs.get("trained") and _label(t) == candidate.label:
            return t
    return None


def _running_twin(study, candidate: Candidate, number: int) -> bool:
    import optuna

    return any(t.number != number and t.user_attrs.get("training") and _label(t) == candidate.label
               for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))


def fail_dead_trials(study) -> list[int]:
    """RUNNING trials of a process on this machine that no longer exists (a killed worker): FAIL, so the sampler
    draws their candidate again. Trials of other machines are left alone. Every trial of a study names its worker
    from the start (ask_named: the study's key holds this code's digest, so no other version writes to it)."""
    import optuna

    host, failed = socket.gethostname(), []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = t.user_attrs.get("worker") or {}       # a trial written by hand into the study: left alone
        if worker.get("host") == host and not _alive(int(worker.get("pid", -1))):
            study.tell(t.number, state=optuna.trial.TrialState.FAIL)
            failed.append(t.number)
    return failed


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
