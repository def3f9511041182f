"""What travels with every artifact: class names, input spec, normalisation, provenance. Written into the ONNX
metadata_props / the IR's rt_info and into a JSON sidecar, always with sorted keys so bytes are stable."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.cache import package_versions

from .onnx_export import INPUT_NAME, OUTPUT_NAME

VERSIONED_PACKAGES = ("edgesmith", "torch", "nncf", "onnx", "onnxruntime", "openvino")

# Sections read after export: they do not change the artifacts, so they do not enter their config hash
# (otherwise a cached export would carry the hash of an older config).
DOWNSTREAM_SECTIONS = ("validate", "release")


def artifact_config_digest(config) -> str:
    """sha256 of the config sections that shape the artifacts (every section but those read after export), as the
    config records them (without where the cache lives). Not the release manifest's config_sha256, which covers
    the whole config: hence its own metadata key."""
    return config.digest(sections=[name for name in config.dump() if name not in DOWNSTREAM_SECTIONS])


def model_metadata(spec, config_digest: str, dynamic_batch: bool, build_key: str = "") -> dict:
    """The shared part; each artifact adds its format and precision. `spec`: the student's
    (pipeline.models.spec.StudentSpec)."""
    inp = spec.input
    return {
        "class_names": list(spec.class_names),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32",
                  "shape": ["batch" if dynamic_batch else 1, inp.channels, inp.size, inp.size]},
        "output": {"name": OUTPUT_NAME, "meaning": "logits over class_names (argmax = prediction)"},
        "preprocessing": preprocessing(spec),
        "arch": spec.arch,
        "artifact_config_sha256": config_digest,
        "build_key": build_key,
        "versions": package_versions(VERSIONED_PACKAGES),
    }


def preprocessing(spec) -> dict:
    """Enough for a device without torch to turn a uint8 image into the model's input with numpy."""
    inp = spec.input
    return {"size": inp.size, "channels": inp.channels, "mean": list(inp.mean), "std": list(inp.std),
            "recipe": "x = (uint8 / 255 - mean) / std per channel; grey <-> RGB by mean/repeat; "
                      "bilinear resize to size x size"}


def flat_properties(meta: dict) -> dict[str, str]:
    """ONNX metadata_props are string pairs: one per top-level key, the value as compact JSON."""
    return {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))
            for key, value in sorted(meta.items())}


def stamp_onnx(path: Path, meta: dict) -> None:
    """Replace the metadata_props, check the model with onnx.checker, write it back in place."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in flat_properties(meta).items():
        proto.metadata_props.add(key=f"edgesmith.{key}", value=value)
    proto.doc_string = "edgesmith model; see metadata_props"
    onnx.checker.check_model(proto, full_check=True)
    Path(path).write_bytes(proto.SerializeToString())


def read_onnx_metadata(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for prop in proto.metadata_props:
        key = prop.key.removeprefix("edgesmith.")
        try:
            out[key] = json.loads(prop.value)
        except json.JSONDecodeError:
            out[key] = prop.value
    return out


def write_sidecar(path: Path, meta: dict) -> Path:
    sidecar = Path(path).with_name(Path(path).name + ".json")
    sidecar.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return sidecar
