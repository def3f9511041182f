"""Does an artifact compute what its PyTorch model computes? Logit distance, top-1 agreement, accuracy."""

from __future__ import annotations

from typing import Callable

import numpy as np

# float32 N x C x H x W -> logits N x k
Runner = Callable[[np.ndarray], np.ndarray]


def run_batched(runner: Runner, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    return np.concatenate([runner(inputs[i:i + batch_size]) for i in range(0, len(inputs), batch_size)])


def parity(artifact_logits: np.ndarray, reference_logits: np.ndarray, labels: np.ndarray) -> dict:
    artifact_pred, reference_pred = artifact_logits.argmax(1), reference_logits.argmax(1)
    return {
        "images": int(len(labels)),
        "max_abs_logit_diff": float(np.abs(artifact_logits - reference_logits).max()),
        "mean_abs_logit_diff": float(np.abs(artifact_logits - reference_logits).mean()),
        "top1_agreement": float((artifact_pred == reference_pred).mean()),
        "accuracy": float((artifact_pred == labels).mean()),
        "reference_accuracy": float((reference_pred == labels).mean()),
    }


def onnxruntime_runner(path, optimized_copy: str | None = None, threads: int = 0) -> Runner:
    """ONNX Runtime on the CPU. `optimized_copy`: also write the graph after ORT's fusions (for inspection)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # the optimized-copy warning is expected
    if threads:
        options.intra_op_num_threads = threads
    if optimized_copy:
        options.optimized_model_filepath = str(optimized_copy)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]


def openvino_runner(xml_path, precision_hint: str = "f32") -> Runner:
    """OpenVINO on the CPU. The hint matters: without f32 this CPU would run 'FP32' models in bf16."""
    import openvino as ov

    compiled = ov.Core().compile_model(str(xml_path), "CPU", {"INFERENCE_PRECISION_HINT": precision_hint})
    output = compiled.output(0)
    return lambda x: compiled(np.ascontiguousarray(x, dtype=np.float32))[output]


def tensorrt_runner(engine_path, input_name: str) -> Runner:
    """A built engine through Polygraphy (only where TensorRT and a GPU exist; never reached on CPU machines)."""
    from polygraphy.backend.common import BytesFromPath
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner

    runner = TrtRunner(EngineFromBytes(BytesFromPath(str(engine_path))))
    runner.activate()  # stays active for the life of the closure: the parity check is one short loop
    return lambda x: np.array(next(iter(runner.infer({input_name: np.ascontiguousarray(x, np.float32)}).values())))
