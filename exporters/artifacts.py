"""artifacts.json: what the export stage hands the validate and release stages and the device, read and written
only here on the edgesmith side (device_tests reads the same file with json alone: it runs without edgesmith).

Each entry of `artifacts` is one file as its format wrote it (exporters.formats): file, format, precision,
size, sha256, parity, and per format sidecar, c_source, c_header, arena_bytes, io, ood, npu (Vela's estimates) ..."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

ARTIFACTS_FILE = "artifacts.json"
SHIPPED_KEYS = ("sidecar", "c_source", "c_header", "vela_input", "vela_ini", "vela_summary", "vela_layers")


@dataclass(frozen=True)
class ArtifactListing:
    artifacts: tuple[dict, ...]
    preprocessing: dict
    class_names: tuple[str, ...]
    eval_set: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"artifacts": list(self.artifacts), "preprocessing": self.preprocessing,
                "class_names": list(self.class_names), "eval_set": self.eval_set, "metadata": self.metadata}

    def write(self, folder: Path) -> Path:
        path = Path(folder) / ARTIFACTS_FILE
        path.write_text(json.dumps(self.to_json(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def from_json(cls, raw: dict) -> "ArtifactListing":
        """Tolerant of a hand-edited or older file: entries that are not objects are dropped, missing keys empty."""
        entries = tuple(a for a in raw.get("artifacts") or [] if isinstance(a, dict))
        from device_tests.bundle import SPEC_KEYS  # the names the device accepts for the preprocessing spec

        spec = next((raw[k] for k in SPEC_KEYS if isinstance(raw.get(k), dict)), {})
        return cls(entries, spec, tuple(str(c) for c in raw.get("class_names") or []),
                   raw.get("eval_set") or {}, raw.get("metadata") or {})

    @classmethod
    def read(cls, folder: Path) -> "ArtifactListing":
        """Raises OSError (no file) or ValueError (not JSON) for the caller to word."""
        return cls.from_json(json.loads((Path(folder) / ARTIFACTS_FILE).read_text()))

    def find(self, format: str, precision: str) -> dict | None:
        return next((a for a in self.artifacts if a.get("format") == format and a.get("precision") == precision), None)

    def model_files(self) -> list[str]:
        """What a runtime loads: every artifact's file, with the weights of an OpenVINO IR (.xml + .bin)."""
        files = []
        for entry in self.artifacts:
            name = entry.get("file")
            if isinstance(name, str):
                files.append(name)
                if name.endswith(".xml"):
                    files.append(name.removesuffix(".xml") + ".bin")
        return files

    def shipped_files(self) -> list[str]:
        """model_files plus what travels with them: metadata sidecars, the C sources (tflm, ethos_u), and for
        ethos_u the .tflite Vela compiled, its .ini and its summary CSVs (so the device can compile it again)."""
        extra = [a.get(key) for a in self.artifacts for key in SHIPPED_KEYS]
        return list(dict.fromkeys(self.model_files() + [f for f in extra if isinstance(f, str)]))
