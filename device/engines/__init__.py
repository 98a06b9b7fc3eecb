"""Inference engines: one interface, a backend per runtime.

An engine runs a bundle's network on a batch of prepared inputs and returns its named outputs
(embedding, fine, coarse, and attributes when the bundle has that head). ONNX Runtime (CPU,
INT8 or FP32) runs everywhere; TensorRT (INT8, FP16 or FP32, device/engines/tensorrt.py) runs
on an NVIDIA GPU, a Jetson's included. 'auto' picks TensorRT where it imports and a CUDA GPU is
present, ONNX Runtime elsewhere.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import numpy as np

from models.bundle import Bundle

BACKENDS = ("onnxruntime", "tensorrt")
PRECISIONS = ("int8", "fp32", "fp16")  # fp16: TensorRT only

log = logging.getLogger("storyscan.engines")


class EngineError(RuntimeError):
    """An engine that cannot be opened; str() is one line."""


class Engine(Protocol):
    backend: str
    precision: str

    def infer(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """[N, 3, H, W] float32 -> {"embedding": [N, D], "fine": [N, F], "coarse": [N, C]},
        plus "attributes": [N, A] logits when the model has the attribute head."""
        ...


def infer_all(engine: Engine, inputs: list[np.ndarray], batch: int = 32) -> dict[str, np.ndarray]:
    """Run many prepared inputs through `engine` in batches; outputs concatenated."""
    parts = [engine.infer(np.stack(inputs[i : i + batch])) for i in range(0, len(inputs), batch)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def pick_backend(backend: str = "auto") -> str:
    """The backend 'auto' (or `backend` itself) stands for on this machine."""
    if backend not in ("auto", *BACKENDS):
        raise EngineError(f"unknown engine backend '{backend}' (choose from auto, "
                          f"{', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    from device.engines.tensorrt import unavailable

    return "onnxruntime" if unavailable() else "tensorrt"


def open_engine(bundle: Bundle, backend: str = "auto", precision: str = "int8",
                threads: int = 0, cache_dir: str | Path | None = None) -> Engine:
    """The engine for `bundle`; 'auto' picks the best backend available on this machine.

    `threads` is ONNX Runtime's; `cache_dir` is where TensorRT keeps the engines it builds
    (default $STORYSCAN_ENGINE_CACHE or ~/.cache/storyscan/engines)."""
    if precision not in PRECISIONS:
        raise EngineError(f"unknown precision '{precision}' (choose from "
                          f"{', '.join(PRECISIONS)})")
    chosen = pick_backend(backend)
    if chosen == "tensorrt":
        from device.engines.tensorrt import TrtEngine, unavailable

        if backend == "tensorrt" and (why := unavailable()):
            raise EngineError(f"TensorRT engine unavailable: {why}")
        try:
            return TrtEngine(bundle, precision, cache_dir)
        except EngineError as e:
            if backend == "tensorrt" or precision == "fp16":
                raise
            log.warning("TensorRT engine failed (%s); using ONNX Runtime", e)
    if precision == "fp16":
        from device.engines.tensorrt import unavailable

        raise EngineError("fp16 runs on the TensorRT engine only (ONNX Runtime runs int8 or "
                          f"fp32){'; here: ' + why if (why := unavailable()) else ''}")
    from device.engines.ort import OrtEngine

    return OrtEngine(bundle.model_path(precision), precision, threads)
