"""The `release` stage: bundle the exported artifacts, evaluation set, device tests and report, with a manifest.

Output (in the stage folder `<output>/<build>/release-<key>/`): `bundle/` and `<build>-<version>.tar.gz`.
After commit, `<output>/<build>/release` is pointed at that folder, so users find the latest release. A build
whose validation fails (no release is cut) removes that pointer: it must not present an older release as the
current one (withdraw_release_link).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Optional

from ..cache import BuildCache, package_versions, sha256_file
from ..config import SECTIONS, EdgesmithConfig
from ..release.bundle import ReleaseError, ReleaseInfo, ReleaseSources, assemble_release
from ..release.manifest import RECORDED_PACKAGES, StageEntry, git_state, host_info
from ..release.signing import sign_bundle
from ..release.tarball import source_date_epoch
from ..stage import Stage, StageContext, StageRecord

LINK_NAME = "release"


class ReleaseStage(Stage):
    name = "release"
    sections = SECTIONS      # the manifest records the full resolved config: every section is in the key
    packages = RECORDED_PACKAGES

    def key_sections(self, cfg: EdgesmithConfig) -> dict:
        return cfg.recorded()     # what the manifest records, so a moved cache folder reuses the release too

    def enabled(self, cfg: EdgesmithConfig) -> bool:
        return cfg.section("release") is not None

    def inputs(self, cfg: EdgesmithConfig) -> tuple[str, ...]:
        optional = tuple(n for n in ("qat", "validate") if cfg.section(n) is not None)
        # export is required: without it the runner reports that this config disables it.
        return ("distill", "export", *optional)

    def run(self, ctx: StageContext) -> dict:
        refuse_failed_validation(ctx.config, ctx.inputs.get("validate"))
        info = release_info(ctx.config, ctx.inputs.values())
        validate = ctx.inputs.get("validate")
        sources = ReleaseSources(export_dir=ctx.inputs["export"].dir, validate_dir=validate.dir if validate else None,
                                 device_tests_dir=device_tests_dir(),
                                 include_eval_set=ctx.config.section("release").include_eval_set)
        sign = ctx.config.section("release").sign
        out = assemble_release(ctx.out, sources, info, sign=(lambda bundle: sign_bundle(
            bundle, sign.private_key, sign.password_env)) if sign is not None else None)
        for item in out.missing:
            ctx.log(f"  release: not in the bundle (not produced upstream): {item}")
        return {"tarball": out.tarball.name, "tarball_sha256": sha256_file(out.tarball),
                "tarball_bytes": out.tarball.stat().st_size, "content_sha256": out.manifest.content_sha256,
                "files": len(out.manifest.files), "missing": out.missing,
                "budget_verdict": out.manifest.budget_verdict, "signed": sign is not None}

    def after_commit(self, record: StageRecord, ctx: Optional[StageContext]) -> None:
        link = refresh_release_link(record.dir)
        if ctx is not None and link is not None:
            ctx.log(f"  release: {link}/{record.metrics.get('tarball', '')}")


def refuse_failed_validation(cfg: EdgesmithConfig, validate: Optional[StageRecord]) -> None:
    """No bundle from a failed validation unless the config says so on purpose."""
    if validate is None or cfg.section("release").allow_failed_validation:
        return
    metrics = validate.metrics
    if metrics.get("passed", True) is False or metrics.get("complete", True) is False:
        withdraw_release_link(validate.dir.parent)
        raise ReleaseError(
            f"The validation this release would ship ({validate.dir}) failed: {metrics.get('missed', '?')} of "
            f"{metrics.get('checks', '?')} checks missed; no release is cut from it.",
            "Fix the model or the target and rebuild, or set release.allow_failed_validation: true to ship it "
            "anyway (the model card then says so in its first line).")


def release_info(cfg: EdgesmithConfig, records: Iterable[StageRecord]) -> ReleaseInfo:
    release = cfg.section("release")
    records = list(records)
    validate = next((r for r in records if r.name == "validate"), None)
    return ReleaseInfo(
        build=cfg.build.name, version=release.version, seed=cfg.build.seed,
        source_date_epoch=source_date_epoch(release.source_date_epoch), config=cfg.recorded(),
        stages=stage_chain(records), budgets=budgets_of(validate.metrics if validate else {}),
        packages=package_versions(RECORDED_PACKAGES), source=git_state(), host=host_info(),
        intended_use=release.intended_use,
    )


def stage_chain(records: Iterable[StageRecord]) -> dict[str, StageEntry]:
    """Key, conditions and metrics of every stage the release depends on, following stage.json inputs."""
    entries: dict[str, StageEntry] = {}
    todo = [(r.name, r.key, _committed_meta(r.dir, r.meta), BuildCache(r.dir.parent)) for r in records]
    while todo:
        name, key, meta, cache = todo.pop()
        if name in entries:
            continue
        # wall_time_s is deliberately left out: it would make every bundle unique.
        entries[name] = StageEntry(key=key, device=meta.get("device"), seed=meta.get("seed"),
                                   versions=meta.get("versions") or {}, metrics=meta.get("metrics") or {})
        for dep, dep_key in sorted((meta.get("inputs") or {}).items()):
            todo.append((dep, dep_key, cache.lookup(dep, dep_key) or {}, cache))
    return dict(sorted(entries.items()))


def _committed_meta(stage_dir: Path, fallback: dict) -> dict:
    # Read stage.json back from disk: a freshly run input's in-memory meta may hold numpy scalars or tuples
    # that serialise differently from the committed file a cached run would read.
    committed = BuildCache.read_meta(stage_dir)
    return committed if committed is not None else json.loads(json.dumps(fallback, default=str))


def budgets_of(validate_metrics: dict) -> list[dict[str, Any]]:
    """The validate stage's budget verdicts as a list of dicts (tolerates a {name: verdict} mapping)."""
    budgets = validate_metrics.get("budgets")
    if isinstance(budgets, dict):
        budgets = [{"budget": name, **(v if isinstance(v, dict) else {"value": v})} for name, v in
                   sorted(budgets.items())]
    if not isinstance(budgets, list):
        return []
    return [b for b in budgets if isinstance(b, dict)]


def device_tests_dir() -> Optional[Path]:
    """The installed device_tests package, copied into every bundle."""
    try:
        import device_tests
    except ImportError:
        return None
    return Path(device_tests.__file__).parent


def refresh_release_link(stage_dir: Path) -> Optional[Path]:
    """Point `<build folder>/release` at this stage folder: a new symlink renamed over the old one."""
    link = stage_dir.parent / LINK_NAME
    if link.exists() and not link.is_symlink():
        return None  # a real folder someone put there: leave it alone
    if link.is_symlink() and os.readlink(link) == stage_dir.name:
        return link  # already right: nothing to write (a fully cached build may run on a read-only cache)
    tmp = stage_dir.parent / f".{LINK_NAME}_link_{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(stage_dir.name, tmp)
        os.replace(tmp, link)
    except OSError:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        return None  # a read-only cache: the bundle is in its stage folder all the same
    return link


def withdraw_release_link(build_dir: Path) -> Optional[str]:
    """After a failed validation (no release cut): remove `<build folder>/release`, so it does not present an
    older passing release as the current one. The old release folder itself stays (release-<key>). Returns the
    folder the link pointed at, or None if there was no link (a real folder someone put there is left alone)."""
    link = Path(build_dir) / LINK_NAME
    if not link.is_symlink():
        return None
    target = os.readlink(link)
    try:
        link.unlink()
    except FileNotFoundError:
        return None
    return target
