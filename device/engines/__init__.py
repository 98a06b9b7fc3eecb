"""Inference engines: one interface, a backend per runtime.

An engine runs a bundle's network on a batch of prepared inputs and returns its named outputs
(embedding, fine, coarse, and attributes when the bundle has that head). ONNX Runtime (CPU) is
the engine everywhere.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from models.bundle import Bundle

BACKENDS = ("onnxruntime",)


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


def open_engine(bundle: Bundle, backend: str = "auto", precision: str = "int8",
                threads: int = 0) -> Engine:
    """The engine for `bundle`; 'auto' picks the best backend available on this machine."""
    if backend not in ("auto", *BACKENDS):
        raise EngineError(f"unknown engine backend '{backend}' (choose from auto, "
                          f"{', '.join(BACKENDS)})")
    from device.engines.ort import OrtEngine

    return OrtEngine(bundle.model_path(precision), precision, threads)
