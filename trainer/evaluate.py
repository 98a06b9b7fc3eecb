"""Evaluate a checkpoint (PyTorch) or a bundle (ONNX, FP32 or INT8) on validation photos.

Writes metrics.json, a per-class table and confusion-matrix PNGs (see trainer/metrics.py).
"""

from __future__ import annotations

import numpy as np

from device.engines import infer_all, open_engine
from models.bundle import load_bundle
from models.preprocess import InputSpec, prepare
from models.tables import format_table
from trainer.errors import ExportError
from trainer.ingest import IngestReport, load_split, read_layout
from trainer.metrics import Report, evaluate_scores, per_class_table, write_report
from trainer.train import load_checkpoint, predict


def evaluate(data: str, out: str, checkpoint: str | None = None, bundle: str | None = None,
             precision: str = "int8") -> Report:
    """Evaluate exactly one of `checkpoint` / `bundle` on the val split of `data`."""
    if bundle:
        b = load_bundle(bundle)
        spec, fine_names, coarse_names = b.input_spec, b.fine_labels, b.coarse_labels
        engine = open_engine(b, precision=precision)
        run = lambda inputs: infer_all(engine, inputs)  # noqa: E731
    else:
        model, ckpt = load_checkpoint(checkpoint)
        spec = InputSpec.from_dict(ckpt["input"])
        fine_names, coarse_names = ckpt["labels"]["fine"], ckpt["labels"]["coarse"]
        run = lambda inputs: predict(model, inputs)  # noqa: E731
    labels, _, val = read_layout(data)
    if labels.fine != fine_names:
        raise ExportError(f"{data}: its products differ from the ones the model was trained on")
    report = IngestReport()
    val = load_split(val, lambda img: prepare(img, spec), report, {}, "validation photos")
    if not len(val):
        raise ExportError(f"{data}: no usable validation photos ({report.summary()})")
    scores = run(val.images)
    y_fine, y_coarse = np.array(val.fine), np.array(val.coarse)
    result = evaluate_scores(scores["fine"], y_fine, scores["coarse"], y_coarse)
    paths = write_report(out, result, scores["fine"].argmax(1), y_fine, fine_names,
                         scores["coarse"].argmax(1), y_coarse, coarse_names)
    print(format_table(result.summary_rows(), list(result.summary_rows()[0])))
    worst = sorted(per_class_table(scores["fine"].argmax(1), y_fine, fine_names),
                   key=lambda r: (r["f1"], -r["support"]))[:10]
    print("\nweakest products:")
    print(format_table(worst, ["class", "support", "precision", "recall", "f1", "mistaken_for"]))
    print(f"\nreport: {', '.join(str(p) for p in paths.values())}")
    return result

