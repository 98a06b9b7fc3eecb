"""ONNX Runtime on the CPU: runs a bundle's INT8 (QDQ) or FP32 model and returns every output
by name (embedding, fine, coarse, and attributes when the model has that head).

The graph runs as the exporter wrote it. ONNX Runtime's `WeightBiasQuantization` pass would
quantise the weights of any FP32 convolution that sits between INT8 layers (one scale for the
whole tensor) so it can fuse it. Depthwise filters differ too much in size for one scale: with
every depthwise convolution kept in FP32, that pass left a Lite2 model (after 1 of 8 epochs)
agreeing with FP32 on 86.5% of val photos against 96.6% without it. The pass is switched off,
so a layer the bundle keeps in FP32 is computed in FP32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from device.engines import EngineError
from models.bundle import OUTPUTS

# ONNX Runtime passes that change what the model computes, not only how fast (an older
# onnxruntime without the pass ignores its name)
DISABLED_OPTIMIZERS = ["WeightBiasQuantization"]


class OrtEngine:
    backend = "onnxruntime"

    def __init__(self, model: Path, precision: str, threads: int = 0) -> None:
        self.precision = precision
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: one per physical core
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self.session = ort.InferenceSession(str(model), options,
                                                providers=["CPUExecutionProvider"],
                                                disabled_optimizers=DISABLED_OPTIMIZERS)
        except Exception as e:  # onnxruntime raises its own untyped errors
            raise EngineError(f"{model}: ONNX Runtime cannot load it "
                              f"({str(e).strip().splitlines()[0]})") from None
        self.outputs = [o.name for o in self.session.get_outputs()]
        missing = [name for name in OUTPUTS if name not in self.outputs]
        if missing:
            raise EngineError(f"{model}: the model lacks the output(s) {', '.join(missing)}")

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        outs = self.session.run(self.outputs, {"image": np.ascontiguousarray(batch, np.float32)})
        return dict(zip(self.outputs, outs, strict=True))
