"""device_tests runs on boards without torch: importing every module of it must not import torch (or the
pipeline's pydantic-heavy modules)."""

import subprocess
import sys

from pipeline.cache import PROJECT_ROOT

MODULES = ["device_tests.measure", "device_tests.conftest", "device_tests.test_bundle", "device_tests.test_artifacts",
           "device_tests.runners.onnxrt", "device_tests.runners.ov", "device_tests.runners.trt", "device_tests.remote_env",
           "device_tests.runners.litert", "device_tests.runners.tflm", "device_tests.runners.executorch",
           "device_tests.vela", "device_tests.test_npu"]
# The ExecuTorch runtime's Python API takes torch tensors: its runner imports torch when it is used (not when
# device_tests is imported), and only that file may say so.
TORCH_ALLOWED = {"executorch.py"}


def test_device_tests_import_no_torch_and_no_pipeline():
    code = ("import sys\n" + "".join(f"import {m}\n" for m in MODULES) +
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pipeline', 'pydantic', 'timm'))\n"
            "print(','.join(bad))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_no_torch_in_device_tests_sources():
    for path in (PROJECT_ROOT / "device_tests").rglob("*.py"):
        if path.name in TORCH_ALLOWED:
            continue
        text = path.read_text()
        assert "import torch" not in text and "from torch" not in text, path
