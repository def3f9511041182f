"""Config validation: shipped configs load, every kind of bad input is reported clearly, all at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import load_config, parse_config
from pipeline.errors import ConfigError

from .conftest import REPO, run_cli, tiny_config_dict

SHIPPED = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_shipped_configs():
    assert any(p.name == "fashion_tops.yaml" for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path: Path):
    cfg = load_config(path)
    assert cfg.build.name and len(cfg.subtask.classes) >= 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_check_accepts_every_shipped_config(path: Path):
    result = run_cli("check", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout


def test_config_is_frozen(tmp_path):
    cfg = parse_config(tiny_config_dict(tmp_path))
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="frozen"):
        cfg.build.seed = 3


def test_unknown_keys_get_did_you_mean_and_all_errors_are_reported_at_once(tmp_path):
    raw = tiny_config_dict(tmp_path)
    raw["build"]["sed"] = 1
    raw["distill"]["temprature"] = 2
    raw["distill"]["epochs"] = -1
    with pytest.raises(ConfigError) as err:
        parse_config(raw, "bad.yaml")
    text = err.value.message
    assert "3 problems" in text
    assert "build.sed: unknown key. Did you mean 'seed'?" in text
    assert "distill.temprature: unknown key. Did you mean 'temperature'?" in text
    assert "distill.epochs" in text and "greater than or equal to 1" in text


def test_config_digest_depends_on_content(tmp_path):
    a = parse_config(tiny_config_dict(tmp_path))
    b = parse_config(tiny_config_dict(tmp_path, **{"distill.epochs": 5}))
    assert a.digest() == parse_config(tiny_config_dict(tmp_path)).digest()
    assert a.digest() != b.digest()


def test_one_config_digest_serves_the_manifest_and_the_artifacts(tmp_path):
    import hashlib
    import json

    from exporters.metadata import artifact_config_digest
    from pipeline.release.manifest import config_sha256

    cfg = parse_config(tiny_config_dict(tmp_path))
    # the value every release manifest records as config_sha256 (of the recorded config, without where the cache
    # lives): its serialisation must not change
    recorded = cfg.recorded()
    manifest_value = hashlib.sha256(json.dumps(recorded, sort_keys=True).encode()).hexdigest()
    assert cfg.digest() == config_sha256(recorded) == manifest_value
    assert cfg.digest(sections=["data", "distill"]) == config_sha256({k: recorded[k] for k in ("data", "distill")})
    assert "output" not in recorded["build"] and recorded["distill"] == cfg.dump()["distill"]
    assert artifact_config_digest(cfg) == cfg.digest(sections=[s for s in cfg.dump() if s not in ("validate", "release")])


def test_malformed_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("build: {name: x\nsubtask: [")
    result = run_cli("check", path)
    assert result.returncode == 2
    assert "not valid YAML" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_config_file(tmp_path):
    result = run_cli("check", tmp_path / "nope.yaml")
    assert result.returncode == 2 and "does not exist" in result.stdout


@pytest.mark.parametrize("override, expected", [
    ({"data.dataset": "fashion_mnsit"}, "Unknown dataset 'fashion_mnsit'. Did you mean 'fashion_mnist'?"),
    ({"subtask.classes": ["T-shirt/top", "Jacket"]}, "'Jacket'"),
    ({"student.arch": "cnn_smal"}, "Unknown architecture 'cnn_smal'. Did you mean 'cnn_small'?"),
    ({"distill.method": "kdd"}, "Unknown distillation method 'kdd'"),
])
def test_unknown_names_list_the_valid_ones(write_config, override, expected):
    result = run_cli("check", write_config(**override))
    assert result.returncode == 2, result.stdout
    assert expected in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_dataset_files_say_how_to_get_them(write_config, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = write_config(**{"data.root": str(empty)})
    result = run_cli("build", path)
    assert result.returncode == 2
    assert "Fashion-MNIST files not found" in result.stdout and "make data" in result.stdout
    assert not (tmp_path / "builds" / "tiny").exists() or not any((tmp_path / "builds" / "tiny").glob("*-*"))


def test_cuda_requested_without_cuda_is_refused_before_anything_is_written(write_config, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = run_cli("build", write_config(**{"build.device": "cuda"}))
    assert result.returncode == 2
    assert "no CUDA device" in result.stdout
    assert not any((tmp_path / "builds").rglob("stage.json"))


def test_config_reference_is_current_and_lists_every_key():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "scripts/config_reference.py", "--check"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    reference = (REPO / "docs" / "config.md").read_text()
    assert "`qat.calibration_size`" in reference and "`validate.budgets.max_p99_ms`" in reference
    assert "config-reference:begin" not in (REPO / "README.md").read_text()   # one copy, in docs/config.md


def test_every_documented_key_has_a_meaning():
    sys_path = str(REPO / "scripts")
    import sys

    sys.path.insert(0, sys_path)
    try:
        from config_reference import _rows
    finally:
        sys.path.remove(sys_path)
    from pipeline.config import EdgesmithConfig

    undocumented = [key for key, _, _, meaning in _rows(EdgesmithConfig) if not meaning]
    assert not undocumented, f"config keys without a description=: {undocumented}"
