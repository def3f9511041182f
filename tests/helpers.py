"""Test fixtures that are real, not mocks: a tiny bundle in the export stage's format (torch ONNX export,
ONNX Runtime Q/DQ quantization, OpenVINO IR), and a throw-away OpenSSH server on 127.0.0.1.
Used by tests/ only."""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

CLASS_NAMES = ["t-shirt", "pullover", "dress", "coat"]
SPEC = {"size": 20, "channels": 1, "mean": [0.286], "std": [0.353]}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tiny_model(num_classes: int):
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, num_classes)).eval()


def make_bundle(root: Path, n_eval: int = 200, raw_size: int = 28, int8: bool = True, openvino: bool = True,
                label_noise: float = 0.2) -> Path:
    """Write model.onnx (+ model.int8.onnx, openvino/model*.xml), eval.npz and artifacts.json into root.

    The labels are the FP32 model's own predictions with `label_noise` of them changed, so the expected
    top-1 of every faithful artifact is known from the torch model without running any runtime."""
    import torch

    from device_tests.preprocess import Preprocess

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    k = len(CLASS_NAMES)
    images = rng.integers(0, 256, (n_eval, 1, raw_size, raw_size), dtype=np.uint8)
    model = _tiny_model(k)
    x = torch.from_numpy(Preprocess.from_spec(SPEC)(images))
    with torch.no_grad():
        # Centre the logits so a random network predicts every class, not one: confusion matrices with content.
        model[-1].bias -= model(x).mean(0)
        fp32_pred = model(x).argmax(1).numpy()
    flip = rng.random(n_eval) < label_noise
    labels = np.where(flip, (fp32_pred + rng.integers(1, k, n_eval)) % k, fp32_pred)
    teacher_pred = np.where(rng.random(n_eval) < 0.9, labels, (labels + 1) % k)
    np.savez(root / "eval.npz", images_u8=images, labels=labels, teacher_pred=teacher_pred, fp32_pred=fp32_pred)
    torch.onnx.export(model, x[:1], root / "model.onnx", input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    files = [("model.onnx", "onnx", "fp32")]
    if int8:
        _quantize(root / "model.onnx", root / "model.int8.onnx", x[:64].numpy())
        files.append(("model.int8.onnx", "onnx", "int8"))
    if openvino:
        import openvino as ov

        (root / "openvino").mkdir(exist_ok=True)
        for src, dst, precision in [("model.onnx", "model.xml", "fp32"), ("model.int8.onnx", "model.int8.xml", "int8")]:
            if (root / src).exists():
                ov.save_model(ov.convert_model(root / src), root / "openvino" / dst, compress_to_fp16=False)
                files.append((f"openvino/{dst}", "openvino", precision))
    artifacts = [{"file": f, "format": fmt, "precision": p, "sha256": _sha256(root / f), "size": (root / f).stat().st_size}
                 for f, fmt, p in files]
    meta = {"artifacts": artifacts, "preprocessing": SPEC, "class_names": CLASS_NAMES}
    (root / "artifacts.json").write_text(json.dumps(meta, indent=1))
    return root


def _quantize(src: Path, dst: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter([{"input": calibration[i:i + 1]} for i in range(len(calibration))])

        def get_next(self):
            return next(self._batches, None)

    quantize_static(str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)


# -- a throw-away OpenSSH server -------------------------------------------------------------------------

SSHD = Path("/usr/sbin/sshd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgesmith-test", "-f", str(path)],
                   check=True, capture_output=True)
    return path


class SshServer:
    """sshd on 127.0.0.1:<free port> with its own config, host key and authorized user key; a context manager.

    `known_hosts` holds the host key (so host-key checking is on), `user_key` the client's private key."""

    def __init__(self, workdir: Path):
        self.dir = Path(workdir)
        self.port = free_port()
        self.user = getpass.getuser()
        self.host_key = self.dir / "host_ed25519"
        self.user_key = self.dir / "user_ed25519"
        self.known_hosts = self.dir / "known_hosts"
        self.process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}"

    def __enter__(self) -> "SshServer":
        self.dir.mkdir(parents=True, exist_ok=True)
        keygen(self.host_key)
        keygen(self.user_key)
        authorized = self.dir / "authorized_keys"
        shutil.copy(self.user_key.with_suffix(".pub"), authorized)
        host_pub = self.host_key.with_suffix(".pub").read_text().split()
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub[0]} {host_pub[1]}\n")
        config = self.dir / "sshd_config"
        config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"AuthorizedKeysFile {authorized}", f"PidFile {self.dir / 'sshd.pid'}",
            "PubkeyAuthentication yes", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
            "UsePAM no", "StrictModes no", "PermitRootLogin prohibit-password", f"AllowUsers {self.user}",
            "Subsystem sftp internal-sftp", "LogLevel ERROR", ""]))
        Path("/run/sshd").mkdir(exist_ok=True) if os.geteuid() == 0 else None  # privilege separation dir
        self.process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.dir / "sshd.log", "wb"))
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd exited: {(self.dir / 'sshd.log').read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if s.recv(4).startswith(b"SSH-"):
                        return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("sshd did not start in time")

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


_SHARED: dict[str, Path] = {}


def shared_bundle() -> Path:
    """One tiny bundle per test process (building it takes a few seconds). Treat it as read-only: copy it
    (shutil.copytree) before altering anything."""
    if "bundle" not in _SHARED:
        import logging
        import tempfile

        logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization warns through the root logger
        _SHARED["bundle"] = make_bundle(Path(tempfile.mkdtemp(prefix="edgesmith-bundle-")) / "bundle")
    return _SHARED["bundle"]


# Latency settings small enough for tests: the protocol is the same, only the counts are tiny.
TINY_LATENCY = {"min_queries": 64, "min_duration_s": 0.05, "warmup": 5, "throughput_batch": 8}
