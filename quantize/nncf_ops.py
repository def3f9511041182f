"""NNCF in three calls: quantize (PTQ), save, load. Heavy imports stay inside the functions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from pipeline.errors import ConfigError

from .config import IgnoredScopeConfig
from .errors import QuantizationError

STATE_FILE = "quantized.pt"
NNCF_CONFIG_FILE = "quantized.nncf.json"


def quantize_ptq(model: nn.Module, calibration: list[torch.Tensor], preset: str = "performance",
                 ignored_scope: IgnoredScopeConfig | None = None) -> nn.Module:
    """Insert fake-quantizers (INT8 weights per channel, INT8 activations) calibrated on `calibration`
    (a list of input batches; one item = one batch). The returned module trains like any other."""
    import nncf

    if not calibration:
        raise QuantizationError("No calibration images: the calibration set is empty.",
                                "Set qat.calibration_size to at least 1 and check the subtask has training images.")
    scope = _ignored_scope(ignored_scope)
    model = model.eval()
    try:
        return nncf.quantize(model, nncf.Dataset(calibration), subset_size=len(calibration),
                             preset=nncf.QuantizationPreset(preset), ignored_scope=scope)
    except nncf.ValidationError as exc:
        if "not found" in str(exc) and scope is not None:
            raise _unknown_scope_error(model, calibration[0], str(exc)) from None
        raise
    except (nncf.UnsupportedModelError, nncf.InternalError, NotImplementedError, RuntimeError) as exc:
        raise QuantizationError(
            f"NNCF could not quantize the model: {type(exc).__name__}: {str(exc).strip().splitlines()[0]}",
            "Leave the offending layers in float with qat.ignored_scope (names, types or patterns of NNCF graph "
            "nodes; `quantize.nncf_ops.graph_nodes(model, example)` lists them), or replace the op in the model.",
        ) from exc


def _ignored_scope(cfg: IgnoredScopeConfig | None):
    import nncf

    if cfg is None or cfg.empty:
        return None
    return nncf.IgnoredScope(names=list(cfg.names), types=list(cfg.types), patterns=list(cfg.patterns))


def graph_nodes(model: nn.Module, example: torch.Tensor) -> list[tuple[str, str]]:
    """(node name, op type) of NNCF's graph of `model`: the vocabulary of qat.ignored_scope."""
    from nncf.torch.function_hook.nncf_graph.nncf_graph_builder import build_nncf_graph

    graph = build_nncf_graph(model, example)
    return [(node.node_name, node.node_type) for node in graph.get_all_nodes()]


def _unknown_scope_error(model: nn.Module, example: torch.Tensor, detail: str) -> ConfigError:
    nodes = [(n, t) for n, t in graph_nodes(model, example) if t not in ("nncf_model_input", "nncf_model_output")]
    listing = ", ".join(f"{name} ({op})" for name, op in nodes[:40])
    return ConfigError(
        f"qat.ignored_scope names layers that are not in the model: {detail.strip().splitlines()[0]}",
        f"Use NNCF node names or op types from this model's graph: {listing}.",
    )


def save_quantized(model: nn.Module, folder: Path) -> None:
    """The NNCF config (where each quantizer sits) as JSON, and the state_dict (weights + quantizer scales)."""
    import nncf.torch

    folder = Path(folder)
    config = nncf.torch.get_config(model)
    (folder / NNCF_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    torch.save(model.state_dict(), folder / STATE_FILE)


def load_quantized(folder: Path, make_float_model: Callable[[], nn.Module]) -> nn.Module:
    """Rebuild the quantized model: the float architecture (BN already folded), NNCF's hooks, then the weights."""
    import nncf.torch

    folder = Path(folder)
    config = json.loads((folder / NNCF_CONFIG_FILE).read_text())
    model = nncf.torch.load_from_config(make_float_model().eval(), config)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def calibration_batches(inputs: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """One image per item: NNCF counts subset_size in dataset items, and per-sample statistics stay exact."""
    return [x.unsqueeze(0) for batch in inputs for x in batch]


def calibration_images(images, view, size: int, seed: int) -> list:
    """The qat stage's calibration set: `size` seeded training images through the student's view, batched for
    NNCF. The export stage calibrates the mobile formats' PT2E INT8 on the same images."""
    import numpy as np
    import torch

    pick = np.sort(np.random.default_rng(seed).permutation(len(images))[:size])
    return calibration_batches([view(torch.as_tensor(images[pick]))])
