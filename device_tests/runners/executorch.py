"""ExecuTorch (.pte, XNNPACK delegate) through the ExecuTorch runtime's Python API. The one runner that needs
torch: executorch.runtime takes and returns torch tensors and imports torch itself (checked with executorch
1.5.1). A phone runs the C++ runtime without Python; here torch is imported only when this runner is used, so
the rest of device_tests stays torch-free (tests/test_device_no_torch.py)."""

from __future__ import annotations

import numpy as np

from .base import Runner, _lazy, register_runner
from .tflite_io import per_image

PTE_IDENTIFIER = b"ET"          # program.fbs file_identifier "ET12" (the digits are the schema version)

MODULE = "executorch.runtime"
_et = _lazy(MODULE, "ExecuTorch",
            "pip install executorch (it brings torch), or the project's `mobile` extra: pip install -e '.[mobile]'")


@register_runner
class ExecuTorchRunner(Runner):
    name = "executorch"
    module = MODULE
    formats = ("executorch",)
    bundle_formats = ("executorch",)
    distribution = "executorch"

    @classmethod
    def available(cls) -> None:
        _et()

    def _activate_impl(self) -> None:
        # ExecuTorch's loader aborts the whole process (C++ terminate) on some malformed files instead of raising:
        # refuse anything that is not an ExecuTorch program flatbuffer (file identifier "ET.." at bytes 4-8) first.
        with open(self.path, "rb") as fh:
            head = fh.read(8)
        if len(head) < 8 or head[4:6] != PTE_IDENTIFIER:
            raise ValueError(f"not an ExecuTorch program (bytes 4-8 are {head[4:8]!r}, not the 'ET..' identifier)")
        runtime = _et().Runtime.get()
        self._program = runtime.load_program(str(self.path))
        self._method = self._program.load_method("forward")
        self.input_shape = tuple(int(d) for d in self._method.metadata.input_tensor_meta(0).sizes())
        import torch  # executorch.runtime has imported it already; tests/test_device_no_torch.py exempts this file

        self._from_numpy = torch.from_numpy

    def _deactivate_impl(self) -> None:
        del self._method, self._program

    def _infer_impl(self, x: np.ndarray) -> np.ndarray:
        return per_image(self._run, x, self.input_shape[0])

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._method.execute([self._from_numpy(np.ascontiguousarray(x))])[0].numpy().copy()

    def _describe_impl(self) -> dict:
        return {"delegate": "XNNPACK"}
