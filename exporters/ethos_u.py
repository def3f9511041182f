"""Arm Ethos-U NPUs (export format `ethos_u`): Arm's Vela compiler turns the INT8 .tflite that the litert and tflm
formats ship into ethos_u/<target>/model_vela.tflite for each configured NPU (export.ethos_u.targets), with Vela's
summary and per-layer CSVs, the estimates read from them (NPU/CPU operators, SRAM and flash, cycles and time per
inference: Vela's performance model, not a measurement), and the model as firmware C sources like tflm's.

The system configs and memory modes come from a Vela .ini: the user's (export.ethos_u.ini) or Arm's vela.ini
shipped with Vela. Either is copied to ethos_u/vela.ini and travels with the artifacts, so that the device suite
can compile the same model again wherever Vela is installed (device_tests/vela.py runs Vela for both)."""

from __future__ import annotations

import configparser
import shutil
from pathlib import Path

from device_tests import vela
from pipeline.errors import ConfigError

from .config import EthosUConfig, NpuTarget
from .errors import ExportError
from .tflm import ALIGN, c_array_source, resolver_method

INI_NAME = "vela.ini"
VELA_MODEL = "model_vela.tflite"
CUSTOM_OP = "ETHOS_U"  # Vela's one custom operator ("ethos-u"); TFLM registers it with AddEthosU()


def ini_source(cfg: EthosUConfig) -> Path:
    return Path(cfg.ini) if cfg.ini else vela.bundled_ini()


def check_ini(cfg: EthosUConfig) -> None:
    """The .ini exists, parses, and holds every system config and memory mode the targets name (ConfigError)."""
    path = ini_source(cfg)
    fix = ("Point export.ethos_u.ini at a Vela configuration file (an .ini with [System_Config.<name>] and "
           "[Memory_Mode.<name>] sections, like the Arm/vela.ini shipped with Vela), or leave it out to use Arm's.")
    if path.suffix != ".ini":
        raise ConfigError(f"export.ethos_u.ini {path} does not end in .ini, which Vela requires of its config files.",
                          fix)
    if not path.is_file():
        raise ConfigError(f"export.ethos_u.ini {path} does not exist.", fix)
    parser = configparser.ConfigParser()
    try:
        parser.read_string(path.read_text(errors="replace"), source=str(path))
    except configparser.Error as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"export.ethos_u.ini {path} is not a valid .ini file: {first}", fix) from None
    for target in cfg.targets:
        system, memory = target.resolved()
        for kind, name in (("System_Config", system), ("Memory_Mode", memory)):
            if not parser.has_section(f"{kind}.{name}"):
                known = sorted(s.split(".", 1)[1] for s in parser.sections() if s.startswith(f"{kind}."))
                raise ConfigError(
                    f"export.ethos_u target {target.folder} asks for {kind} '{name}', which {path} does not define "
                    f"(it defines {', '.join(known) or 'none'}).",
                    f"Name one of those in the target's {kind.lower()}, or add a [{kind}.{name}] section to the .ini.")


def write_ini(cfg: EthosUConfig, folder: Path) -> Path:
    """ethos_u/vela.ini: the .ini the models are compiled with, shipped beside them."""
    check_ini(cfg)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / INI_NAME
    shutil.copyfile(ini_source(cfg), path)
    return path


def setting(target: NpuTarget, cfg: EthosUConfig) -> vela.NpuSetting:
    system, memory = target.resolved()
    return vela.NpuSetting(target.accelerator, system, memory, cfg.optimise)


def compile_target(source: Path, folder: Path, target: NpuTarget, cfg: EthosUConfig, ini: Path, io: dict) -> dict:
    """ethos_u/<target>/: model_vela.tflite, summary.csv, per_layer.csv, model_data.cc/.h; returns the
    artifacts.json extras (paths relative to `folder`'s grandparent, the export folder)."""
    npu = setting(target, cfg)
    scratch = folder / ".vela"
    try:
        out = vela.compile_model(source, scratch, npu, ini)
    except vela.VelaError as exc:
        raise ExportError(exc.problem, exc.fix) from None
    estimates = vela.estimates(out, npu)
    model = folder / VELA_MODEL
    shutil.move(out.model, model)
    shutil.move(out.summary, folder / "summary.csv")
    layers = folder / "per_layer.csv"
    if out.per_layer is not None:
        shutil.move(out.per_layer, layers)
    shutil.rmtree(scratch, ignore_errors=True)
    ops = _resolver_ops(model)
    header, c_source = write_c_sources(folder, model.read_bytes(), estimates, ops, io)

    def rel(path: Path) -> str:
        return path.relative_to(folder.parent.parent).as_posix()

    return {"npu": estimates, "io": io, "ops": ops, "vela_input": rel(source), "vela_ini": rel(ini),
            "vela_summary": rel(folder / "summary.csv"),
            **({"vela_layers": rel(layers)} if layers.is_file() else {}),
            "c_source": rel(c_source), "c_header": rel(header)}


def _resolver_ops(model: Path) -> list[str]:
    """The operators the firmware registers: Vela's custom operator and the CPU-fallback builtins."""
    from .tflite_file import builtin_ops

    return [CUSTOM_OP if op == "CUSTOM" else op for op in builtin_ops(model)]


def write_c_sources(folder: Path, data: bytes, npu: dict, ops: list[str], io: dict,
                    symbol: str = "g_model_data") -> tuple[Path, Path]:
    """model_data.h / model_data.cc beside model_vela.tflite: the compiled model as an aligned C array, what it
    was compiled for, Vela's SRAM estimate and the op resolver registrations."""
    header, source = folder / "model_data.h", folder / "model_data.cc"
    guard = "EDGESMITH_MODEL_DATA_H_"
    registrations = " \\\n    ".join(f"(resolver).{resolver_method(op)}();" for op in ops)
    names = ", ".join(f'"{op}"' for op in ops)
    q_in, q_out = io["input"], io["output"]
    header.write_text(f"""// Generated by edgesmith: the INT8 model compiled by Vela for an Arm Ethos-U NPU. Do not edit.
// Run it with TensorFlow Lite Micro built with the Ethos-U kernel and driver (ethos-u-core-driver).
#ifndef {guard}
#define {guard}

#include <stddef.h>
#include <stdint.h>

// model_vela.tflite, byte for byte, aligned to {ALIGN} bytes (the NPU reads its command stream and weights in place).
extern const unsigned char {symbol}[];
extern const unsigned int {symbol}_len;
#define EDGESMITH_MODEL_DATA_LEN {len(data)}u

// Compiled for (Vela {npu['vela_version']}):
#define EDGESMITH_NPU_ACCELERATOR "{npu['accelerator']}"
#define EDGESMITH_NPU_SYSTEM_CONFIG "{npu['system_config']}"
#define EDGESMITH_NPU_MEMORY_MODE "{npu['memory_mode']}"
// Vela's estimate of the SRAM the NPU's tensors take; the tensor arena holds them plus TFLite Micro's own data.
#define EDGESMITH_NPU_SRAM_BYTES {int(round(npu['sram_kib'] * 1024))}u

// Operators: tflite::MicroMutableOpResolver<EDGESMITH_OP_COUNT> resolver; EDGESMITH_ADD_OPS(resolver);
#define EDGESMITH_OP_COUNT {len(ops)}
#define EDGESMITH_OP_NAMES {{{names}}}
#define EDGESMITH_ADD_OPS(resolver) \\
  do {{ \\
    {registrations} \\
  }} while (0)

// Input {q_in['dtype']} {q_in['shape']}: q = round(x / scale) + zero_point, x = the preprocessed (normalised) image.
#define EDGESMITH_INPUT_SCALE {q_in['scale']!r}f
#define EDGESMITH_INPUT_ZERO_POINT {q_in['zero_point']}
// Output {q_out['dtype']} {q_out['shape']}: logit = (q - zero_point) * scale; argmax = the class.
#define EDGESMITH_OUTPUT_SCALE {q_out['scale']!r}f
#define EDGESMITH_OUTPUT_ZERO_POINT {q_out['zero_point']}

#endif  // {guard}
""")
    source.write_text(c_array_source(data, symbol, f"model_vela.tflite (Vela, {npu['accelerator']})"))
    return header, source


def log_line(folder: str, npu: dict) -> str:
    cpu = ", ".join(c["operator"] for c in npu["cpu_fallback"]) or "none"
    return (f"export: ethos_u/{folder}: {npu['npu_ops']} ops on the NPU, {npu['cpu_ops']} on the CPU ({cpu}); "
            f"SRAM {npu['sram_kib']:.1f} KiB, flash {npu['flash_kib']:.1f} KiB; estimated "
            f"{npu['inference_ms']:.3f} ms ({npu['cycles']} cycles at {npu['clock_mhz']:g} MHz, Vela)")
