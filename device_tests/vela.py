"""Arm Vela (PyPI `ethos-u-vela`): compile an INT8 .tflite for an Ethos-U NPU and read its estimates. Used by the
export stage (exporters/ethos_u.py) and by the device suite, which re-runs it where Vela is installed; neither
needs torch or numpy. Vela is called through its command line (`python -m ethosu.vela`), the interface Arm keeps
stable, with an argument list (no shell).

What Vela writes into --output-dir for <stem>.tflite: <stem>_vela.tflite (the NPU part as one `ethos-u` custom
operator per NPU subgraph, CPU-fallback operators left as TFLite builtins), <stem>_summary_<system config>.csv
(one row: memory use, cycles, inference time at the system config's clock) and, with --verbose-performance,
<stem>_per-layer.csv (one row per operator: target NPU/CPU, cycles, MACs, share of the network)."""

from __future__ import annotations

import csv
import hashlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import DeviceTestError

MODULE = "ethosu.vela"
DISTRIBUTION = "ethos-u-vela"
TIMEOUT_S = 600
KIB = 1024
# "CPU operators = 1 (14.3%)": Vela's count of the network's operators (the original TFLite ones) per target.
OP_COUNT = re.compile(r"^(CPU|NPU) operators = (\d+)", re.MULTILINE)
# "Warning (supported operators) operator: MEAN, ofm: 'name'" followed by "Reason: ..." lines.
FALLBACK = re.compile(r"operator: (\w+), ofm: '([^']*)'\s*\nReason: ([^\n]*(?:\n(?!Warning|\n)[^\n]*)?)")


class VelaError(DeviceTestError):
    """Vela could not compile the model (or is not installed)."""


def available() -> bool:
    try:
        return importlib.util.find_spec(MODULE) is not None
    except (ImportError, ValueError):
        return False


def version() -> Optional[str]:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        return None


def bundled_ini() -> Path:
    """Arm's vela.ini shipped with Vela: the system configs and memory modes of Arm's reference systems."""
    spec = importlib.util.find_spec("ethosu")
    if spec is None or not spec.submodule_search_locations:
        raise VelaError("Vela (ethos-u-vela) is not installed.", "Install it with `pip install ethos-u-vela`.")
    return Path(list(spec.submodule_search_locations)[0]) / "config_files" / "Arm" / "vela.ini"


@dataclass(frozen=True)
class NpuSetting:
    accelerator: str      # e.g. ethos-u55-128
    system_config: str    # a [System_Config.<name>] of the ini: clock, bus widths, where weights live
    memory_mode: str      # a [Memory_Mode.<name>] of the ini: which memories the NPU's AXI ports reach
    optimise: str = "Performance"

    def args(self, ini: Path) -> list[str]:
        # An absolute path: Vela reads a two-part relative path such as "ethos_u/vela.ini" as one of its own
        # config_files folders.
        return ["--accelerator-config", self.accelerator, "--system-config", self.system_config,
                "--memory-mode", self.memory_mode, "--config", str(Path(ini).resolve()), "--optimise", self.optimise]


@dataclass
class VelaOutput:
    model: Path           # <stem>_vela.tflite
    summary: Path         # the summary CSV
    per_layer: Optional[Path]
    log: str              # Vela's stdout and stderr


def compile_model(source: Path, out_dir: Path, setting: NpuSetting, ini: Path) -> VelaOutput:
    """Run Vela on `source`, its files written into `out_dir` (created)."""
    if not available():
        raise VelaError("Vela (ethos-u-vela) is not installed in this Python.",
                        "Install it with `pip install ethos-u-vela` (edgesmith's `npu` extra).")
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [sys.executable, "-m", MODULE, str(Path(source).resolve()), "--output-dir", str(out_dir.resolve()),
            "--verbose-performance", *setting.args(ini)]
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VelaError(f"Vela did not compile {Path(source).name} for {setting.accelerator} within {TIMEOUT_S} s.",
                        "Try a smaller model or another accelerator configuration.") from None
    log = proc.stdout + proc.stderr
    stem = Path(source).stem
    model, summaries = out_dir / f"{stem}_vela.tflite", sorted(out_dir.glob(f"{stem}_summary_*.csv"))
    if proc.returncode != 0 or not model.is_file() or not summaries:
        tail = " | ".join(line for line in log.strip().splitlines()[-6:] if line.strip())
        raise VelaError(f"Vela failed to compile {Path(source).name} for {setting.accelerator} "
                        f"({setting.system_config}, {setting.memory_mode}), exit {proc.returncode}: {tail}",
                        "Check export.ethos_u (accelerator, system_config, memory_mode, ini) against the message.")
    per_layer = out_dir / f"{stem}_per-layer.csv"
    return VelaOutput(model, summaries[0], per_layer if per_layer.is_file() else None, log)


def _number(value: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0


def read_summary(path: Path) -> dict:
    """The summary CSV's one row, numbers as floats."""
    with open(path, newline="") as fh:
        row = next(csv.DictReader(fh))
    return {k: (v if k in ("experiment", "network", "accelerator_configuration", "system_config", "memory_mode",
                           "weights_storage_area", "feature_map_storage_area") else _number(v))
            for k, v in row.items()}


def read_layers(path: Optional[Path]) -> list[dict]:
    """One dict per row of the per-layer CSV: operator, target, cycles, MACs, share of the network's cycles."""
    if path is None:
        return []
    with open(path, newline="") as fh:
        return [{"operator": row["Original Operator"], "npu_operator": row["NNG Operator"], "target": row["Target"],
                 "cycles": int(_number(row["Op Cycles"])), "cycles_percent": round(_number(row["Network% (cycles)"]), 2),
                 "macs": int(_number(row["MAC Count"])), "mac_utilisation_percent": round(_number(row["Util% (MAC)"]), 2),
                 "name": row["Name"]} for row in csv.DictReader(fh)]


def estimates(out: VelaOutput, setting: NpuSetting) -> dict:
    """What the build records per NPU configuration (all Vela estimates, none measured on a device)."""
    summary, layers = read_summary(out.summary), read_layers(out.per_layer)
    counts = {target.lower(): int(n) for target, n in OP_COUNT.findall(out.log)}
    reasons = {name: " ".join(reason.split()) for _, name, reason in FALLBACK.findall(out.log)}
    cpu = list({(row["operator"], row["name"]): {"operator": row["operator"], "name": row["name"],
                                                 "reason": reasons.get(row["name"], "")}
                for row in layers if row["target"] == "CPU"}.values())
    clock = summary.get("core_clock", 0.0)
    off_sram = (summary.get("off_chip_flash_memory_used", 0.0) + summary.get("on_chip_flash_memory_used", 0.0)
                + summary.get("dram_memory_used", 0.0))
    return {
        "accelerator": setting.accelerator, "system_config": setting.system_config, "memory_mode": setting.memory_mode,
        "optimise": setting.optimise, "clock_mhz": round(clock / 1e6, 3),
        "weights_in": summary.get("weights_storage_area"), "feature_maps_in": summary.get("feature_map_storage_area"),
        "npu_ops": counts.get("npu", sum(1 for r in layers if r["target"] == "NPU")),
        "cpu_ops": counts.get("cpu", len(cpu)), "cpu_fallback": cpu,
        "sram_kib": round(summary.get("sram_memory_used", 0.0), 3),
        # KiB of the memory outside SRAM that Vela places the weights in: flash, or DRAM in a DRAM system config
        "flash_kib": round(off_sram, 3),
        "cycles": int(summary.get("cycles_total", 0)), "npu_cycles": int(summary.get("cycles_npu", 0)),
        "inference_ms": round(summary.get("inference_time", 0.0) * 1e3, 6),
        "macs": int(summary.get("nn_macs", 0)), "layers": layers,
        "vela_version": version(),
    }


def compile_and_estimate(source: Path, setting: NpuSetting, ini: Path) -> tuple[bytes, dict]:
    """Vela's .tflite (bytes) and its estimates, compiled in a scratch folder (the device suite's re-run)."""
    tmp = Path(tempfile.mkdtemp(prefix="edgesmith-vela-"))
    try:
        out = compile_model(source, tmp, setting, ini)
        return out.model.read_bytes(), estimates(out, setting)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def slowest_layers(layers: list[dict], n: int = 5) -> list[dict]:
    return sorted((r for r in layers if r["cycles"] > 0), key=lambda r: -r["cycles"])[:n]


def device_record(root: Path, entry: dict, file: str, sha256: Optional[str]) -> dict:
    """What the device suite records for one ethos_u artifact: the estimates the export recorded (artifacts.json)
    and, where Vela is installed and the bundle holds its input, the same compilation run again here."""
    recorded = entry.get("npu")
    if not isinstance(recorded, dict) or "cycles" not in recorded:
        raise VelaError(f"{file} has no Vela estimates in artifacts.json.", "Re-run the export stage to record them.")
    record = {"artifact": file, **recorded, "recompiled": None}
    source, ini = entry.get("vela_input"), entry.get("vela_ini")
    if not available():
        record["recompiled_note"] = "Vela is not installed here: the estimates recorded at export are used"
        return record
    if not (isinstance(source, str) and isinstance(ini, str) and (root / source).is_file() and (root / ini).is_file()):
        record["recompiled_note"] = "the bundle lacks Vela's input .tflite or .ini: the recorded estimates are used"
        return record
    setting = NpuSetting(recorded["accelerator"], recorded["system_config"], recorded["memory_mode"],
                         recorded.get("optimise", "Performance"))
    data, again = compile_and_estimate(root / source, setting, root / ini)
    record["recompiled"] = {"vela_version": again["vela_version"],
                            "same_bytes": hashlib.sha256(data).hexdigest() == sha256,
                            **{k: again[k] for k in ESTIMATE_KEYS}}
    return record


# The estimates a re-run compares (and the budgets read).
ESTIMATE_KEYS = ("npu_ops", "cpu_ops", "sram_kib", "flash_kib", "cycles", "inference_ms")
