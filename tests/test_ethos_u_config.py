"""The ethos_u export format's bad inputs, before anything is built: an unknown accelerator config, a Vela .ini that
is missing, malformed or lacks the named system config, and the format asked for without the `npu` extra. Each is
one paragraph, exit 2, no traceback, and nothing cached."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import parse_config
from pipeline.errors import ConfigError
from tests.conftest import tiny_config_dict

ROOT = Path(__file__).resolve().parent.parent
NO_VELA = "import sys; sys.modules['ethosu'] = None; "  # as if ethos-u-vela were not installed


def config(tmp_path: Path, **ethos_u) -> Path:
    path = tmp_path / "npu.yaml"
    path.write_text(yaml.safe_dump(tiny_config_dict(
        tmp_path / "builds", **{"export.formats": ["onnx", "ethos_u"], "qat": {"mode": "ptq", "calibration_size": 8},
                                "export.ethos_u": ethos_u or {"targets": ["ethos-u55-128"]}})))
    return path


def edgesmith(*args, prelude: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", prelude + "from pipeline.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)


def assert_refused(proc: subprocess.CompletedProcess, tmp_path: Path, *words: str) -> None:
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    for word in words:
        assert word in " ".join(output.split()), (word, output[-3000:])
    builds = tmp_path / "builds"
    assert not builds.exists() or not any(p.is_dir() for p in builds.rglob("*-*")), "a stage was cached"


def test_unknown_accelerator_lists_the_valid_ones(tmp_path):
    raw = yaml.safe_load(config(tmp_path, targets=["ethos-u55-100"]).read_text())
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    text = err.value.message
    assert "unknown Ethos-U accelerator config 'ethos-u55-100'" in text and "ethos-u85-2048" in text
    assert "ethos-u55-128" in text
    assert_refused(edgesmith("build", config(tmp_path, targets=["ethos-u55-100"])), tmp_path,
                   "ethos-u55-100", "Valid accelerator configs")


def test_targets_sharing_a_folder_are_refused(tmp_path):
    raw = yaml.safe_load(config(tmp_path, targets=["ethos-u55-128", {"accelerator": "ethos-u55-128",
                                                                      "system_config": "Ethos_U55_Deep_Embedded"}]).read_text())
    with pytest.raises(ConfigError, match="distinct `name`"):
        parse_config(raw)


@pytest.mark.parametrize("case", ["missing", "malformed", "no_such_system_config"])
def test_a_bad_vela_ini_is_refused_before_any_stage(tmp_path, case):
    ini = tmp_path / "board.ini"
    if case == "malformed":
        ini.write_text("core_clock=500e6\n[System_Config.Board\n")
    elif case == "no_such_system_config":
        ini.write_text("[System_Config.Board]\ncore_clock=400e6\n[Memory_Mode.Shared_Sram]\nconst_mem_area=Axi1\n")
    words = {"missing": ["board.ini does not exist"], "malformed": ["is not a valid .ini file"],
             "no_such_system_config": ["System_Config 'Ethos_U55_High_End_Embedded'", "it defines Board"]}[case]
    proc = edgesmith("build", config(tmp_path, targets=["ethos-u55-128"], ini=str(ini)))
    assert_refused(proc, tmp_path, *words, "export.ethos_u")


def test_the_format_without_the_npu_extra_is_refused_by_check_and_build(tmp_path):
    cfg = config(tmp_path)
    for command in ("check", "build"):
        assert_refused(edgesmith(command, cfg, prelude=NO_VELA), tmp_path, "ethos_u", "`npu` extra", ".[npu]")


def test_the_ini_content_is_in_the_export_key(tmp_path):
    from pipeline.stages.export import ExportStage

    ini = tmp_path / "board.ini"
    ini.write_text("[System_Config.Board]\ncore_clock=400e6\n")
    cfg = parse_config(yaml.safe_load(config(tmp_path, targets=["ethos-u55-128"], ini=str(ini)).read_text()))
    before = ExportStage().key_sections(cfg)["ethos_u_ini_sha256"]
    ini.write_text("[System_Config.Board]\ncore_clock=200e6\n")
    assert ExportStage().key_sections(cfg)["ethos_u_ini_sha256"] != before
