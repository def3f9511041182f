"""The report's "Fits on the NPU" section: for every artifact compiled by Vela for an Arm Ethos-U NPU (export format
ethos_u), Vela's estimates as the device suite recorded them (NPU and CPU operators, the CPU-fallback operators by
name, SRAM, flash, cycles, time per inference) against the max_npu_* budgets, and the slowest layers. Every
number is Vela's performance model at the system config's clock and memory mode, not a measurement."""

from __future__ import annotations

from typing import Optional

from ..report import Section, esc, html_table, md_table
from .budgets import NPU_BUDGETS, NPU_RUNTIME, Verdict

HEADERS = ["target", "artifact", "accelerator", "system config", "memory mode", "clock MHz", "NPU ops", "CPU ops",
           "CPU-fallback operators", "SRAM KiB", "flash KiB", "est. ms", "cycles", "fits"]
LAYER_HEADERS = ["artifact", "operator", "target", "cycles", "% of cycles", "MACs", "MAC utilisation %", "layer"]
SLOWEST = 5


def npu_points(runs) -> list[tuple[str, dict]]:
    return [(r.target, npu) for r in runs for npu in (r.results or {}).get("npu", [])]


def npu_section(runs, verdicts: list[Verdict]) -> Optional[Section]:
    points = npu_points(runs)
    if not points:
        return None
    budgets = {key for key, _ in NPU_BUDGETS}
    allowed = {(v.target, v.artifact, v.budget): v for v in verdicts if v.runtime == NPU_RUNTIME and v.budget in budgets}
    rows, classes = [], []
    for target, npu in points:
        checked = [v for (t, a, _), v in allowed.items() if t == target and a == npu["artifact"]]
        fits = "no budget" if not checked else "yes" if all(v.ok for v in checked) else "NO"
        cpu = ", ".join(f"{c['operator']} ({c['name']})" for c in npu["cpu_fallback"]) or "none"
        rows.append([target, npu["artifact"], npu["accelerator"], npu["system_config"], npu["memory_mode"],
                     npu["clock_mhz"], npu["npu_ops"], npu["cpu_ops"], cpu, npu["sram_kib"], npu["flash_kib"],
                     npu["inference_ms"], npu["cycles"], fits])
        classes.append("fail" if fits == "NO" else "ok")
    layers = [[npu["artifact"], r["operator"], r["target"], r["cycles"], r["cycles_percent"], r["macs"],
               r["mac_utilisation_percent"], short_layer(r["name"])]
              for npu in _once(points) for r in _slowest(npu.get("layers", []))]
    clocks = sorted({f"{npu['accelerator']}: {npu['clock_mhz']:g} MHz, {npu['system_config']}, {npu['memory_mode']}"
                     for _, npu in points})
    note = ('<p class="note">Vela estimates, not measurements: cycles and time come from Vela\'s performance model '
            f"of the NPU at the clock, memories and memory mode of each system config ({esc('; '.join(clocks))}). "
            "SRAM: what Vela allocates for the NPU's tensors (the tensor arena holds it plus TFLite Micro's own data); "
            "flash: where Vela places the weights and command stream (flash, or DRAM in a DRAM system config). "
            "CPU-fallback operators run on the Cortex-M under TFLite Micro; their time is not in the estimate.</p>")
    layer_note = (f'<p class="note">The {SLOWEST} slowest layers of each compiled model, from Vela\'s per-layer '
                  "estimate (a fused activation shares its convolution's row; full names in results-*.json).</p>")
    body = (html_table(HEADERS, rows, classes, left=5) + note + "<h3>Slowest layers (Vela's estimate)</h3>"
            + html_table(LAYER_HEADERS, layers, left=3) + layer_note)
    md = (md_table(HEADERS, rows) + "\n\nVela estimates at " + "; ".join(clocks) + " (not measured on a device).\n\n"
          + md_table(LAYER_HEADERS, layers))
    return Section("Fits on the NPU", body, md)


def short_layer(name: str) -> str:
    """The module a TFLite tensor name comes from, e.g. "features.4.0 (Conv2d)" for litert-torch's
    "pkg.SmallCNN/torch.nn.modules.container.Sequential_features/...Sequential_4/torch.nn.modules.conv.Conv2d_0;1"
    (a fused activation's name lists both modules: the convolution is named). Other names are kept, clipped."""
    parts = [p for p in name.split(";;") if p]
    chosen = next((p for p in parts if ".conv." in p), parts[0] if parts else name).split(";")[0]
    modules = chosen.split("/")[1:]
    if not modules or not all("_" in m for m in modules):
        return name if len(name) <= 60 else name[:57] + "..."
    leaves = [m.rsplit(".", 1)[-1] for m in modules]
    path = ".".join(leaf.rsplit("_", 1)[1] for leaf in leaves)
    return f"{path} ({leaves[-1].rsplit('_', 1)[0]})"


def _slowest(layers: list[dict]) -> list[dict]:
    return sorted((r for r in layers if r["cycles"] > 0), key=lambda r: -r["cycles"])[:SLOWEST]


def _once(points: list[tuple[str, dict]]) -> list[dict]:
    """Each artifact once: the estimate depends on the model and the NPU, not on the target that read it."""
    seen = {}
    for _, npu in points:
        seen.setdefault(npu["artifact"], npu)
    return list(seen.values())
