"""The runner: plans the chain (pipeline.stages.CHAIN), keys each stage by what it depends on, reuses or rebuilds."""

from __future__ import annotations

import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from . import distributed
from .cache import BuildCache, DigestCache, code_digest, package_versions, stage_key
from .config import EdgesmithConfig, resolved_device
from .errors import CacheError, ConfigError, DeviceError, DiskFullError, EdgesmithError
from .progress import ProgressDisplay
from .registry import Registry
from .seeds import seed_everything, seed_for
from .stage import Stage, StageContext, StageRecord
from .stages import CHAIN

STAGE_ORDER = tuple(stage.name for stage in CHAIN)
STAGES: Registry[type[Stage]] = Registry("stage")
for _stage in CHAIN:
    STAGES.register(_stage.name)(_stage)

# Config values that name files whose CONTENT a stage depends on: section -> fields. Their digests join the key
# of every stage that hashes the section, so replacing a checkpoint or a dataset at the same path re-runs them.
CONTENT_INPUTS = {"teacher": ("weights", "class_names"), "data": ("root", "unlabelled", "labels_file")}


def resolve_device(requested: str) -> str:
    """build.device on this machine ('auto' resolved), or DeviceError for 'cuda' without a GPU."""
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise DeviceError("build.device is 'cuda' but no CUDA device is available on this machine.",
                          "Set build.device to 'auto' or 'cpu', or run on a machine with a GPU and a CUDA build of torch.")
    return resolved_device(requested)


def run_stage(cfg: EdgesmithConfig, name: str, out: Path, inputs: dict[str, Path], progress: ProgressDisplay | None = None,
              device: str = "cpu") -> dict:
    """One stage of the chain outside a build: seeded as a build seeds it, written into `out` (no cache, no key),
    its inputs read from the given folders ({"adapt": folder, ...}). For benchmarks and tools that time or vary a
    single stage; returns its metrics."""
    return STAGES.get(name)().run(stage_context(cfg, name, out, inputs, progress, device)) or {}


def stage_context(cfg: EdgesmithConfig, name: str, out: Path, inputs: dict[str, Path],
                  progress: ProgressDisplay | None = None, device: str = "cpu") -> StageContext:
    """What run_stage hands the stage (seeded as a build seeds it): for tools that run parts of a stage."""
    stage = STAGES.get(name)()
    missing = [n for n in stage.inputs(cfg) if n not in inputs]
    if missing:
        raise ConfigError(f"Stage '{name}' reads {', '.join(missing)}, which were not given.",
                          f"Pass the folders of {', '.join(missing)} (e.g. a build's committed stage folders).")
    records = {n: StageRecord(n, "given", Path(inputs[n]), BuildCache.read_meta(inputs[n]) or {}) for n in stage.inputs(cfg)}
    seed_everything(seed_for(cfg, "global"), cfg.build.threads)
    Path(out).mkdir(parents=True, exist_ok=True)
    progress = progress or ProgressDisplay(enabled=False)
    return StageContext(cfg, Path(out), records, progress, f"manual-{name}", device)


@dataclass
class PlannedStage:
    stage: Stage
    key: str
    inputs: dict[str, str]
    sections: dict
    versions: dict[str, str]
    code: str


class Build:
    def __init__(self, cfg: EdgesmithConfig):
        self.cfg = cfg
        self.cache = BuildCache(Path(cfg.build.output) / cfg.build.name)

    def stages(self, until: str | None = None) -> list[Stage]:
        if until is not None and until not in STAGE_ORDER:
            STAGES.get(until)  # raises the did-you-mean error
        chosen = []
        for name in STAGE_ORDER:
            if name in STAGES and STAGES.get(name)().enabled(self.cfg):
                chosen.append(STAGES.get(name)())
            if name == until:
                break
        return chosen

    def plan(self, until: str | None = None) -> list[PlannedStage]:
        keys: dict[str, str] = {}
        plan = []
        digests = DigestCache(self.cache.root / ".digests.json")
        for stage in self.stages(until):
            missing = [n for n in stage.inputs(self.cfg) if n not in keys]
            if missing:
                raise ConfigError(f"Stage '{stage.name}' needs {', '.join(missing)}, which this config disables.",
                                  "Add the missing config sections.")
            inputs = {n: keys[n] for n in stage.inputs(self.cfg)}
            sections = stage.key_sections(self.cfg)
            contents = content_digests(self.cfg, stage.sections, digests)
            if contents:
                sections = {**sections, "content": contents}
            versions = package_versions(stage.packages)
            code = code_digest(stage.code)
            key = stage_key(stage.name, sections, inputs, code, versions)
            keys[stage.name] = key
            plan.append(PlannedStage(stage, key, inputs, sections, versions, code))
        digests.save()
        return plan

    def status(self) -> list[tuple[str, str, bool]]:
        rows = []
        for p in self.plan():
            meta = self.cache.lookup(p.stage.name, p.key, verify=self.cfg.build.verify_cache)
            rows.append((p.stage.name, p.key[:16], meta is not None and p.stage.reusable(meta)))
        return rows

    def pending(self, plan: list[PlannedStage], force: tuple[str, ...] = ()) -> list[str]:
        """The planned stages a build would run (not cached, forced, a failure to retry, or reading one of those)."""
        names: list[str] = []
        retried: set[str] = set()           # as in run: a failure to retry re-runs what reads it, --force does not
        for p in plan:
            meta, retry = self._reusable(p, p.stage.name in force, any(n in retried for n in p.inputs))
            if retry:
                retried.add(p.stage.name)
            if meta is None:
                names.append(p.stage.name)
        return names

    def _reusable(self, planned: PlannedStage, forced: bool, retry: bool) -> tuple[dict | None, bool]:
        """The cached stage.json the build reuses for `planned` (None: it runs), and whether it runs as a retry:
        its own cached result records a failure to retry, or `retry` says an input was retried."""
        meta = None if forced else self.cache.lookup(planned.stage.name, planned.key, verify=self.cfg.build.verify_cache)
        retry = retry or (meta is not None and not planned.stage.reusable(meta))
        return (None if retry else meta), retry

    def read_only(self, plan: list[PlannedStage], force: tuple[str, ...] = ()) -> CacheError | None:
        """None when the build folder can be written (the build takes the lock). When it cannot: the reason, if
        every planned stage is cached (the build reuses them all and writes nothing, so it needs no lock); else
        the CacheError of the stages that would have to write there."""
        problem = self.cache.problem()
        if problem is None:
            return None
        pending = self.pending(plan, force)
        if not pending and not distributed.world().distributed:
            return problem
        need = (f" Not every stage is cached: {', '.join(pending)} must run and write there." if pending
                else " A build in several processes writes there even when every stage is cached.")
        raise CacheError(problem.problem + need, problem.fix)

    def run(self, progress: ProgressDisplay, force: tuple[str, ...] = (), until: str | None = None,
            wait: bool = True) -> list[dict]:
        for name in force:
            STAGES.get(name)
        device = distributed.device_name(resolve_device(self.cfg.build.device))
        plan = self.plan(until)
        summary = []
        timeout = self.cfg.distributed.timeout_min if self.cfg.distributed else None
        read_only = self.read_only(plan, force)
        if read_only is not None:
            progress.log(f"[yellow]note:[/] every stage is cached and the cache is read-only, so this build runs "
                         f"without the lock and writes nothing ({read_only.problem})")
        with distributed.session(device, timeout), nullcontext() if read_only is not None else self._lock(wait, progress):
            records: dict[str, StageRecord] = {}
            # Stages re-run because their cached result recorded a failure to retry: what reads them runs again
            # too (same key, new content). --force alone does not propagate (the README promises that).
            retried: set[str] = set()
            with progress.live():
                for planned in plan:
                    retry = any(n in retried for n in planned.inputs)
                    record, cached, ctx, retry = self._run_one(planned, records, progress, device,
                                                               planned.stage.name in force, retry)
                    if retry:
                        retried.add(planned.stage.name)
                    records[planned.stage.name] = record
                    summary.append({"stage": planned.stage.name, "key": planned.key[:16], "cached": cached,
                                    "wall_s": record.meta.get("wall_time_s", 0.0), "metrics": record.metrics,
                                    "dir": str(record.dir)})
                    if distributed.is_main():
                        ctx = ctx or StageContext(self.cfg, record.dir, {n: records[n] for n in planned.inputs},
                                                  progress, planned.key, device)
                        planned.stage.after_commit(record, ctx)
        return summary

    def _lock(self, wait: bool, progress: ProgressDisplay):
        """Rank 0 holds the cache lock and sweeps; the other processes only check they see the same folder."""
        @contextmanager
        def locked():
            with self.cache.lock(wait=wait, say=progress.log) if distributed.is_main() else nullcontext():
                if distributed.is_main():
                    self.cache.sweep_stale()
                distributed.check_shared_folder(self.cache.tmp_root)
                yield
        return locked()

    @contextmanager
    def _disk_full_is_clear(self, stage: str):
        """A full disk shows up as OSError(ENOSPC) or as a library's own error (torch.save raises RuntimeError):
        whatever the stage raised, if the build folder's disk has no room left, say that."""
        try:
            yield
        except Exception as exc:
            if not _disk_full(self.cache.root, exc):
                raise
            raise DiskFullError(
                f"The disk holding {self.cache.root} is full: stage '{stage}' could not write its output "
                f"({type(exc).__name__}: {str(exc)[:200]}). Nothing half-written was kept; the stages committed "
                "before it are intact.",
                "Free some space (or set build.output to a larger disk), then run the same build again: it goes on "
                "from the last committed stage.") from None

    @contextmanager
    def _workspace(self, stage: str, key: str):
        # Only rank 0 stages into the cache; other processes of a distributed stage write into a private scratch
        # folder that is thrown away (same stage code everywhere, one writer of the cache).
        if distributed.is_main():
            with self.cache.staging(stage, key) as tmp:
                yield tmp
        else:
            with tempfile.TemporaryDirectory(prefix=f"edgesmith-{stage}-rank{distributed.world().rank}-") as tmp:
                yield Path(tmp)

    def _run_one(self, planned: PlannedStage, records, progress, device, forced: bool, retry: bool):
        stage = planned.stage
        meta, own_retry = self._reusable(planned, forced, retry)
        if own_retry and not retry:
            progress.log(f"[yellow]↻[/] {stage.name:<10} its cached result records a failure to retry: running again")
        retry = own_retry
        meta = distributed.broadcast_object(meta)        # rank 0's view of the cache decides for every process
        inputs = {n: records[n] for n in planned.inputs}
        if meta is not None:
            progress.log(f"[green]✓[/] {stage.name:<10} cached  {self.cache.path(stage.name, planned.key)}")
            return StageRecord(stage.name, planned.key, self.cache.path(stage.name, planned.key), meta), True, None, False
        progress.log(f"[cyan]▶[/] {stage.name:<10} running (key {planned.key[:16]})")
        seed_everything(seed_for(self.cfg, "global"), self.cfg.build.threads)
        start = time.perf_counter()
        final, ctx = self.cache.path(stage.name, planned.key), None
        if stage.distributed or distributed.is_main():
            with self._disk_full_is_clear(stage.name), self._workspace(stage.name, planned.key) as tmp:
                ctx = StageContext(self.cfg, tmp, inputs, progress, planned.key, device)
                metrics = stage.run(ctx) or {}
                meta = {"stage": stage.name, "key": planned.key, "inputs": planned.inputs, "config": planned.sections,
                        "versions": planned.versions, "code": planned.code, "device": device, "seed": self.cfg.build.seed,
                        "wall_time_s": round(time.perf_counter() - start, 3), "metrics": metrics}
                if distributed.world().distributed:
                    meta["world_size"] = distributed.world().size
                if stage.distributed:
                    distributed.barrier()    # committed only once every process has finished the stage
                if distributed.is_main():
                    final = self.cache.commit(tmp, stage.name, planned.key, meta)
        # The other processes wait here for rank 0's committed result (a failure anywhere stops them all).
        meta = distributed.broadcast_object(meta if distributed.is_main() else None)
        progress.log(f"[green]✓[/] {stage.name:<10} done in {meta['wall_time_s']:.1f} s  {final}")
        return StageRecord(stage.name, planned.key, final, meta), False, ctx, retry


def _disk_full(root: Path, exc: BaseException) -> bool:
    import errno
    import os

    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        st = os.statvfs(root)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < (1 << 20)  # under 1 MiB left: the error was the disk's


def content_digests(cfg: EdgesmithConfig, sections: tuple[str, ...], digests: DigestCache) -> dict[str, str]:
    """{"teacher.weights": sha256, "data.root": sha256, ...} for the input files and folders a stage's sections
    name and that exist (a missing one is the stage's own error to report)."""
    found = {}
    for name in sections:
        section = cfg.section(name)
        for field_name in CONTENT_INPUTS.get(name, ()):
            value = getattr(section, field_name, None)
            if not isinstance(value, str) or not value:
                continue
            path = _input_path(name, field_name, value)
            digest = digests.of(path) if path is not None else None
            if digest is not None:
                found[f"{name}.{field_name}"] = digest
    return found


def _input_path(section: str, field_name: str, value: str) -> Path | None:
    if section == "teacher" and field_name == "weights":
        from .models.teachers import resolve_weights_path

        try:
            return resolve_weights_path(value)
        except EdgesmithError:
            return None
    return Path(value)




def search_worker(cfg: EdgesmithConfig, progress: ProgressDisplay) -> int:
    """One worker of the student search: the stages before it are built (or found cached) under the build lock,
    then trials run without it, into the study the build's search stage reads."""
    from .stages.search import work

    build = Build(cfg)
    plan = build.plan(until="search")
    search = plan[-1]
    build.run(progress, until=plan[-2].stage.name)
    inputs = {n: StageRecord(n, k, build.cache.path(n, k), {}) for n, k in search.inputs.items()}
    device = distributed.device_name(resolve_device(cfg.build.device))
    with tempfile.TemporaryDirectory(prefix="edgesmith-search-") as tmp, progress.live():
        return work(StageContext(cfg, Path(tmp), inputs, progress, search.key, device))
