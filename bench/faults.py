"""Is the stage cache crash-safe? SIGKILL a tiny build at random moments and between commit renames.

Kills a real build of configs/tiny.yaml at random moments in every stage and during the commit renames, rebuilds
each time, and checks that no cache entry is ever half-written and that the final artifacts are byte-identical to
an uninterrupted build. Also: two builds of one config started together, and a build on a full disk (a small tmpfs
mounted here: needs root; skipped with a note otherwise).

    python -m bench faults                  # 30 random kills + 6 between renames, about 10-15 min on 2 cores
    python -m bench faults --quick          # 8 + 2 kills

Prints a table and writes bench/results/faults.json. The config is the tiny one made smaller still (a few dozen
Fashion-MNIST images, one epoch per stage, a 16-query latency run) and carried through every stage: the point is
the cache's behaviour under faults, and a short build lets many kills land in every stage. Every file that two
uninterrupted builds write identically is compared; files that differ between two uninterrupted builds (latency
measurements and what embeds them) are listed as such and only checked for integrity.
"""

from __future__ import annotations

import json
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from bench._common import ROOT, TINY_CONFIG, parse, parser, write_results
from pipeline.cache import BuildCache, sha256_file
from pipeline.config import config_with

BUILD = "faults"
STAGES = ("teacher", "adapt", "distill", "qat", "export", "validate", "release")
RENAME_STEPS = ("before-rename", "old-moved-aside")
# NNCF compiles a C++ extension on first use into TORCH_EXTENSIONS_DIR; a private folder keeps other venvs on this
# machine from invalidating it, and no load timeout lets the first compile finish on a loaded machine.
BUILD_ENV = {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", "NNCF_EXTENSION_LOAD_TIMEOUT": "0",
             "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".venv" / "torch_extensions"))}


# configs/tiny.yaml, smaller, with every stage after distill switched on.
FAULTS_CONFIG = {
    "build.name": BUILD, "data.train_per_class": 16, "data.test_per_class": 8,
    "distill.epochs": 1, "distill.batch_size": 16,
    "qat": {"calibration_size": 16, "epochs": 1, "batch_size": 16, "max_images": 32},
    "export": {"formats": ["onnx"], "parity_limit": 16, "eval_images": 16},
    "validate": {"latency": {"min_queries": 16, "min_duration_s": 0.01, "warmup": 1, "throughput_batch": 4}},
    "release": {"version": "0.0.1"},
}


def write_config(folder: Path, output: Path) -> Path:
    """The faults config with its builds under `output`, as a YAML file in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "faults.yaml"
    path.write_text(yaml.safe_dump(config_with(TINY_CONFIG, {**FAULTS_CONFIG, "build.output": str(output)}).dump()))
    return path


# -- running builds --------------------------------------------------------------------------------------

class BuildProcess:
    """`edgesmith build` in its own process group; stdout lines arrive with their time on a queue."""

    def __init__(self, config: Path, *args: str, env: dict | None = None):
        self.start = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "build", str(config), *args],
                                     cwd=ROOT,      # this checkout's pipeline, whatever the venv has installed
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                     start_new_session=True,
                                     env={**os.environ, **BUILD_ENV, **(env or {})})
        self.lines: "queue.Queue[tuple[float, str]]" = queue.Queue()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put((time.monotonic() - self.start, line))

    def wait_for(self, text: str, timeout: float) -> float | None:
        """Seconds since start when a line containing text appeared; None if the build ended or timed out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                at, line = self.lines.get(timeout=0.05)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    return None
                continue
            if text in line:
                return at
        return None

    def kill(self) -> bool:
        """SIGKILL the whole group; True if the build was still running (the kill landed)."""
        alive = self.proc.poll() is None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        return alive

    def finish(self, timeout: float = 600) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return -9

    @property
    def text(self) -> str:
        time.sleep(0.1)
        return "".join(self.output)


def timeline(config: Path) -> tuple[dict[str, tuple[float, float]], float]:
    """An uninterrupted build from scratch: (start, end) of each stage in seconds since the process started."""
    build = BuildProcess(config)
    starts, ends = {}, {}
    while True:
        try:
            at, line = build.lines.get(timeout=0.2)
        except queue.Empty:
            if build.proc.poll() is not None and build.lines.empty():
                break
            continue
        for stage in STAGES:
            if f"▶ {stage} " in line:
                starts[stage] = at
            if f"✓ {stage} " in line and "done" in line:
                ends[stage] = at
    code = build.finish()
    if code != 0:
        raise SystemExit(f"the reference build failed (exit {code}):\n{build.text[-3000:]}")
    total = time.monotonic() - build.start
    return {s: (starts[s], ends[s]) for s in STAGES if s in starts}, total


# -- checking the cache ----------------------------------------------------------------------------------

def entries(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and "-" in p.name)


def corrupt_entries(root: Path) -> list[str]:
    """Every stage folder that is not whole: no/invalid stage.json, or a listed file missing or different."""
    bad = []
    if not root.is_dir():
        return bad
    for folder in entries(root):
        try:
            meta = json.loads((folder / BuildCache.STAGE_FILE).read_text())
        except (OSError, ValueError):
            bad.append(f"{folder.name}: no readable stage.json")
            continue
        damaged = BuildCache.damaged(folder, meta.get("files") or [], verify=True)
        if damaged is not None or not isinstance(meta.get("files"), list):
            bad.append(f"{folder.name}: {damaged or 'no file list'}")
    return bad


def digests(root: Path) -> dict[str, str]:
    """sha256 of every file of every stage folder (stage.json aside: it holds wall times), by stage/path."""
    out = {}
    for folder in entries(root):
        stage = folder.name.split("-", 1)[0]
        for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != BuildCache.STAGE_FILE):
            out[f"{stage}/{path.relative_to(folder).as_posix()}"] = sha256_file(path)
    return out


def folder_names(root: Path) -> set[str]:
    return {p.name for p in entries(root)}


# -- one trial -------------------------------------------------------------------------------------------

@dataclass
class Trial:
    stage: str
    kind: str                    # "random" (a moment inside the stage) or a commit step (rename)
    delay_s: float
    landed: bool = False
    killed_in: str = ""          # the stage actually running when the kill landed, from the build's own log
    corrupt_after_kill: list[str] = field(default_factory=list)
    rebuild_exit: int | None = None
    corrupt_after_rebuild: list[str] = field(default_factory=list)
    identical: bool = False
    differing: list[str] = field(default_factory=list)
    wall_s: float = 0.0


def running_stage(lines: list[str]) -> str:
    current = "startup"
    for line in lines:
        for stage in STAGES:
            if f"▶ {stage} " in line:
                current = stage
            elif f"✓ {stage} " in line:
                current = f"after {stage}"
    return current


def prepare(reference: Path, work: Path, drop_from: str | None) -> Path:
    """A copy of the reference build folder without the stages from drop_from on (None: keep all)."""
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(reference, work, symlinks=True)
    if drop_from is not None:
        for stage in STAGES[STAGES.index(drop_from):]:
            for folder in work.glob(f"{stage}-*"):
                shutil.rmtree(folder)
    return work


def run_trial(trial: Trial, config: Path, reference: Path, build_dir: Path, deterministic: dict[str, str],
              spans: dict) -> Trial:
    began = time.monotonic()
    if trial.kind == "random":
        prepare(reference, build_dir, trial.stage)
        build = BuildProcess(config)
        if build.wait_for(f"▶ {trial.stage} ", timeout=300) is not None:
            time.sleep(trial.delay_s)
        trial.landed = build.kill()
        time.sleep(0.1)
        trial.killed_in = running_stage(build.output) if trial.landed else "(build had ended)"
    else:
        # Kill between the renames of a commit: --force over an existing folder of the same key, paused there.
        prepare(reference, build_dir, None)
        hook = build_dir.parent / f"hook-{os.getpid()}.log"
        hook.unlink(missing_ok=True)
        build = BuildProcess(config, "--force", trial.stage,
                             env={"EDGESMITH_FAULT_HOOK": str(hook), "EDGESMITH_FAULT_PAUSE_S": "30"})
        deadline = time.monotonic() + 300
        wanted = f"{trial.kind} {trial.stage}-"
        while time.monotonic() < deadline and build.proc.poll() is None:
            if hook.is_file() and any(line.startswith(wanted) for line in hook.read_text().splitlines()):
                break
            time.sleep(0.02)
        trial.landed = build.kill()
        trial.killed_in = f"{trial.stage} commit" if trial.landed else "(build had ended)"
        hook.unlink(missing_ok=True)
    trial.corrupt_after_kill = corrupt_entries(build_dir)
    rebuild = BuildProcess(config)
    trial.rebuild_exit = rebuild.finish()
    trial.corrupt_after_rebuild = corrupt_entries(build_dir)
    final = digests(build_dir)
    trial.differing = sorted(k for k, v in deterministic.items() if final.get(k) != v)
    trial.identical = trial.rebuild_exit == 0 and not trial.differing
    if trial.rebuild_exit != 0:
        trial.differing.append(f"rebuild failed: {rebuild.text[-600:]}")
    trial.wall_s = round(time.monotonic() - began, 1)
    return trial


# -- concurrency and a full disk -------------------------------------------------------------------------

def concurrent_builds(folder: Path, deterministic: dict[str, str]) -> dict:
    output = folder / "builds"
    shutil.rmtree(output, ignore_errors=True)
    config = write_config(folder, output)
    a, b = BuildProcess(config), BuildProcess(config)
    codes = [a.finish(), b.finish()]
    final = digests(output / BUILD)
    waited = any("Waiting for another build" in p.text for p in (a, b))
    return {"exit_codes": codes, "one_waited_for_the_other": waited, "corrupt": corrupt_entries(output / BUILD),
            "identical": codes == [0, 0] and all(final.get(k) == v for k, v in deterministic.items())}


def full_disk(folder: Path, reference_bytes: int) -> dict:
    """A build whose output is a tmpfs too small for it: a clear error, nothing corrupt; then, with room, the
    same build finishes from where it stopped."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return {"skipped": "needs root to mount a tmpfs"}
    mount = folder / "full"
    mount.mkdir(parents=True, exist_ok=True)
    size_kib = max(256, reference_bytes // 2 // 1024)  # about half of what the build writes
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(mount)], check=True)
    try:
        config = write_config(folder / "full_cfg", mount)
        build = BuildProcess(config)
        code = build.finish()
        text = build.text
        committed = sorted(p.name.split("-", 1)[0] for p in entries(mount / BUILD)) if (mount / BUILD).is_dir() else []
        result = {"tmpfs_kib": size_kib, "exit_code": code, "traceback": "Traceback" in text,
                  "message": next((line.strip() for line in text.splitlines() if line.startswith("error")), ""),
                  "stages_committed": committed, "corrupt": corrupt_entries(mount / BUILD),
                  "leftover_tmp": sorted(p.name for p in (mount / BUILD / ".tmp").glob("*"))
                  if (mount / BUILD / ".tmp").is_dir() else []}
        subprocess.run(["mount", "-o", f"remount,size={reference_bytes * 3 // 1024}k", str(mount)], check=True)
        again = BuildProcess(config)
        result["exit_code_with_room"] = again.finish()
        result["corrupt_with_room"] = corrupt_entries(mount / BUILD)
        return result
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# -- report ----------------------------------------------------------------------------------------------

def table(trials: list[Trial]) -> str:
    rows = [("stage / kill point", "kills", "landed", "landed inside", "rebuilds ok", "corrupt entries",
             "artifacts identical")]
    groups: dict[str, list[Trial]] = {}
    for t in trials:
        groups.setdefault(t.stage if t.kind == "random" else f"{t.stage} @ {t.kind}", []).append(t)
    for name, ts in groups.items():
        inside = sum(t.killed_in == t.stage or t.killed_in == f"{t.stage} commit" for t in ts)
        rows.append((name, str(len(ts)), str(sum(t.landed for t in ts)), str(inside),
                     str(sum(t.rebuild_exit == 0 for t in ts)),
                     str(sum(len(t.corrupt_after_kill) + len(t.corrupt_after_rebuild) for t in ts)),
                     f"{sum(t.identical for t in ts)}/{len(ts)}"))
    rows.append(("total", str(len(trials)), str(sum(t.landed for t in trials)),
                 str(sum(t.killed_in in (t.stage, f"{t.stage} commit") for t in trials)),
                 str(sum(t.rebuild_exit == 0 for t in trials)),
                 str(sum(len(t.corrupt_after_kill) + len(t.corrupt_after_rebuild) for t in trials)),
                 f"{sum(t.identical for t in trials)}/{len(trials)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def parse_args(argv=None):
    p = parser("faults", __doc__)
    p.add_argument("--kills", type=int, default=30, help="random kill moments, spread over the stages")
    p.add_argument("--renames", type=int, default=6, help="kills between the renames of a commit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--budget-s", type=float, default=None,
                   help="start no new trial after this many seconds (the report says how many ran)")
    p.add_argument("--work", type=Path, default=Path("/tmp/edgesmith-faults"))
    args = parse(p, argv)
    if args.quick:
        args.kills, args.renames = 8, 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    rng = random.Random(args.seed)
    shutil.rmtree(args.work, ignore_errors=True)
    started = time.monotonic()

    # 1. Two uninterrupted builds from scratch: the timeline, and which files every build writes identically.
    ref_cfg = write_config(args.work / "ref", args.work / "ref" / "builds")
    spans, total = timeline(ref_cfg)
    reference = args.work / "ref" / "builds" / BUILD
    twin_cfg = write_config(args.work / "twin", args.work / "twin" / "builds")
    timeline(twin_cfg)
    ref, twin = digests(reference), digests(args.work / "twin" / "builds" / BUILD)
    deterministic = {k: v for k, v in ref.items() if twin.get(k) == v}
    measurements = sorted(k for k in ref if twin.get(k) != ref[k])
    print(f"reference build: {total:.1f} s; stages " +
          ", ".join(f"{s} {e - b:.1f} s" for s, (b, e) in spans.items()))
    print(f"{len(deterministic)} files identical between two uninterrupted builds; {len(measurements)} differ "
          f"(measurements): {', '.join(measurements)}")

    # 2. Kill points: every stage gets its share, each at a random moment inside its reference span.
    stages = [s for s in STAGES if s in spans]
    plan = [stages[i % len(stages)] for i in range(args.kills)]
    trials = [Trial(s, "random", round(rng.uniform(0.0, 0.9) * (spans[s][1] - spans[s][0]), 3)) for s in plan]
    rename_stages = [s for s in ("distill", "export", "release", "qat", "teacher", "validate") if s in spans]
    trials += [Trial(rename_stages[i % len(rename_stages)], RENAME_STEPS[i % len(RENAME_STEPS)], 0.0)
               for i in range(args.renames)]
    rng.shuffle(trials)  # interleaved: a run cut short by --budget-s still covers every stage
    config = write_config(args.work / "trial", args.work / "trial" / "builds")
    build_dir = args.work / "trial" / "builds" / BUILD
    planned = len(trials)
    for i, trial in enumerate(list(trials), 1):
        if args.budget_s is not None and time.monotonic() - started > args.budget_s:
            trials = trials[:i - 1]
            print(f"time budget reached: {len(trials)} of {planned} trials ran")
            break
        run_trial(trial, config, reference, build_dir, deterministic, spans)
        print(f"[{i}/{len(trials)}] {trial.stage:<9} {trial.kind:<15} +{trial.delay_s:5.2f} s  landed {trial.landed!s:<5} "
              f"in {trial.killed_in:<16} "
              f"rebuild {trial.rebuild_exit}  corrupt {len(trial.corrupt_after_kill) + len(trial.corrupt_after_rebuild)}  "
              f"identical {trial.identical}  ({trial.wall_s} s)", flush=True)

    # 3. Two builds of one config at once; a build on a full disk.
    together = concurrent_builds(args.work / "together", deterministic)
    ref_bytes = sum(p.stat().st_size for p in reference.rglob("*") if p.is_file())
    disk = full_disk(args.work, ref_bytes)

    print()
    print(table(trials))
    print(f"\ntwo builds started together: exit codes {together['exit_codes']}, one waited for the other: "
          f"{together['one_waited_for_the_other']}, corrupt entries {len(together['corrupt'])}, "
          f"artifacts identical {together['identical']}")
    if "skipped" in disk:
        print(f"full disk: skipped ({disk['skipped']})")
    else:
        print(f"full disk ({disk['tmpfs_kib']} KiB tmpfs): exit {disk['exit_code']}, traceback {disk['traceback']}, "
              f"committed {disk['stages_committed']}, corrupt {len(disk['corrupt'])}, leftover temp folders "
              f"{len(disk['leftover_tmp'])}; message: {disk['message'][:300]}")
        print(f"  the same build with room: exit {disk['exit_code_with_room']}, corrupt {len(disk['corrupt_with_room'])}")
    result = {"config": {"base": "configs/tiny.yaml", "overrides": FAULTS_CONFIG}, "reference_s": round(total, 1),
              "stage_spans_s": {s: [round(b, 2), round(e, 2)] for s, (b, e) in spans.items()},
              "deterministic_files": len(deterministic), "measurement_files": measurements,
              "trials_planned": planned, "trials": [asdict(t) for t in trials], "concurrent": together, "full_disk": disk,
              "summary": {"kills": len(trials), "landed": sum(t.landed for t in trials),
                          "rebuilds_ok": sum(t.rebuild_exit == 0 for t in trials),
                          "corrupt_entries": sum(len(t.corrupt_after_kill) + len(t.corrupt_after_rebuild) for t in trials),
                          "identical": sum(t.identical for t in trials)},
              "wall_s": round(time.monotonic() - started, 1)}
    write_results(args.out, result, args.command)
    print(f"\nwrote {args.out} ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
