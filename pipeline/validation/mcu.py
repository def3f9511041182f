"""The report's "fits on the MCU" section: for every artifact measured under TFLite Micro, the tensor arena the
allocator used (RAM) and the flatbuffer size (flash) against validate.budgets.max_arena_kb / max_flash_kb."""

from __future__ import annotations

from typing import Optional

from ..report import Section, html_table, md_table, passed_runs
from .budgets import KIB, Verdict

HEADERS = ["target", "artifact", "arena used KiB", "max_arena_kb", "flash KiB", "max_flash_kb", "fits"]


def mcu_section(runs, verdicts: list[Verdict]) -> Optional[Section]:
    points = [(t, run) for t, run in passed_runs(runs) if "arena_used_bytes" in run]
    if not points:
        return None
    allowed = {(v.target, v.artifact, v.budget): v for v in verdicts if v.budget in ("max_arena_kb", "max_flash_kb")}
    rows, classes = [], []
    for target, run in points:
        arena, flash = (allowed.get((target, run["artifact"], key)) for key in ("max_arena_kb", "max_flash_kb"))
        checked = [v for v in (arena, flash) if v is not None]
        fits = "no budget" if not checked else "yes" if all(v.ok for v in checked) else "NO"
        rows.append([target, run["artifact"], run["arena_used_bytes"] / KIB, arena.allowed if arena else None,
                     run["flash_bytes"] / KIB, flash.allowed if flash else None, fits])
        classes.append("fail" if fits == "NO" else "ok")
    note = ('<p class="note">Arena: what TFLite Micro\'s recording allocator took for tensors, scratch buffers and '
            "interpreter structures (the RAM to reserve; model_data.h carries the measured minimum plus a margin). "
            "Flash: the .tflite flatbuffer (weights and graph) as it is linked from tflm/model_data.cc; the kernels' "
            "code is not included.</p>")
    return Section("Fits on the MCU", html_table(HEADERS, rows, classes, left=2) + note, md_table(HEADERS, rows))
