"""The same artifact on several targets, image by image: does an ARM board (or any other target) give the
answers the first target gives? Each target's suite records the logits of every artifact on the evaluation set
(device_tests/accuracy.py); here they are compared with the first target's: top-1 on each, top-1 agreement,
max |dlogit|. INT8 kernels differ between CPUs (x86 VNNI vs ARM dot-product), so an INT8 artifact may flip a
few borderline images; an FP32 one should agree to float rounding."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from device_tests.accuracy import decode_logits

from ..report import Section, html_table, md_table, passed_runs
from .suite import TargetRun

# FP32 logits of one artifact on two CPUs: float rounding of differently ordered sums, as between the FP32
# artifact and PyTorch at export time.
FP32_LOGIT_TOLERANCE = 1e-4


@dataclass(frozen=True)
class CrossTarget:
    artifact: str
    runtime: str
    precision: str
    reference: str     # the first target that measured this artifact x runtime
    target: str
    top1_reference: float
    top1: float
    agreement: float   # fraction of evaluation images with the same top-1 on both targets
    max_dlogit: float  # max |logit difference| over all images and classes

    def to_dict(self) -> dict:
        return asdict(self)


def compare(runs: list[TargetRun]) -> list[CrossTarget]:
    """Every artifact x runtime measured on more than one target, each later target against the first."""
    first: dict[tuple[str, str], tuple[str, dict]] = {}
    rows = []
    for target, run in passed_runs(runs):
        logits = run.get("accuracy", {}).get("logits")
        if logits is None:
            continue
        key = (run["artifact"], run["runtime"])
        if key not in first:
            first[key] = (target, run)
            continue
        ref_target, ref = first[key]
        a, b = decode_logits(ref["accuracy"]["logits"]), decode_logits(logits)
        if a.shape != b.shape:
            continue
        rows.append(CrossTarget(run["artifact"], run["runtime"], run.get("precision", "?"), ref_target, target,
                                ref["accuracy"]["top1"], run["accuracy"]["top1"],
                                float((a.argmax(1) == b.argmax(1)).mean()), float(np.abs(a - b).max())))
    return rows


def cross_target_section(runs: list[TargetRun]) -> Optional[Section]:
    rows = compare(runs)
    if not rows:
        return None
    headers = ["artifact", "runtime", "precision", "reference", "target", "top-1 reference", "top-1 target",
               "top-1 agreement", "max |dlogit|"]
    cells = [[r.artifact, r.runtime, r.precision, r.reference, r.target, r.top1_reference, r.top1, r.agreement,
              f"{r.max_dlogit:.2e}"] for r in rows]
    note = ('<p class="note">The same artifact and runtime on two targets, image by image on the evaluation set. '
            "INT8 kernels differ between CPUs (x86 and ARM use different integer dot products), so an INT8 artifact "
            f"may flip a few borderline images; FP32 logits should differ by float rounding only (below "
            f"{FP32_LOGIT_TOLERANCE:g}).</p>")
    return Section("Across targets", html_table(headers, cells, left=5) + note, md_table(headers, cells))
