"""Export a trained checkpoint as a kiosk bundle: ONNX FP32 and calibrated ONNX INT8.

INT8 is ONNX Runtime static quantisation in QDQ form: per-channel symmetric int8 weights and
uint8 activations, which ONNX Runtime's CPU kernels run fastest and most faithfully (see
bench/int8_fidelity.py). Only the backbone is quantised, and not its first `fp32_convs`
convolutions (the stem and first block, where INT8 error enters) nor the `fp32_sensitive`
convolutions whose INT8 error moves the product scores most, each tried back in FP32 on
calibration photos (`trainer/quantize.py`); the small heads stay FP32 so embeddings keep their
precision. The calibration photos are training photos passed through the
shared `prepare`, exactly as the kiosk will see them. The INT8 model must agree with FP32 on
the validation photos (top-1 product) at least `min_agreement` of the time, or no bundle is
written.

The bundle also carries the open-set threshold: the best similarity, as the kiosk's matcher
computes it from INT8 embeddings over what it searches (prototypes and the catalog's reference
photos), that keeps `UNKNOWN_TAR` of the validation photos INT8 recognises correctly; a scan
below it is unknown on the kiosk.

A model trained with attribute labels gets a fourth ONNX output, `attributes` (multi-label
logits), and the manifest a `heads.attributes` entry with their names and the probability
threshold the kiosk reports them at; the metrics add each precision's attribute micro-F1.

TensorRT: by default (`--tensorrt onnx`) the kiosk builds its engine from the bundle's ONNX on
first start. `--tensorrt torch2trt`, on a GPU workstation or a Jetson, also converts the FP32
network with torch2trt (INT8 calibrated on the same training photos, FP16 where INT8 does not
fit) and ships the engine in the bundle, named and recorded in the manifest with its TensorRT
version and GPU: a kiosk with the same pair loads it instead of building one. It must agree
with FP32 on the validation photos as INT8 must.
"""

from __future__ import annotations

import copy
import importlib.util
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from device.engines import infer_all
from device.engines.ort import OrtEngine
from device.matcher import Matcher
from models.bundle import ATTRIBUTES, Bundle, load_array, logit, write_bundle
from models.preprocess import InputSpec, prepare
from models.recognizer import FlipAveraged, Recognizer
from trainer.config import FEATURE_WEIGHT, FP32_CONVS, FP32_SENSITIVE, MIN_AGREEMENT
from trainer.errors import ExportError
from trainer.ingest import (
    IngestReport,
    Split,
    drop_products,
    load_split,
    read_layout,
    read_references,
)
from trainer.metrics import evaluate_scores, micro_f1, multi_hot, threshold_at_tar
from trainer.quantize import QuantOptions, quantize_int8
from trainer.train import holdout_products, load_checkpoint, predict

OPSET = 17
UNKNOWN_TAR = 0.95  # share of correctly recognised val photos the unknown threshold keeps
ATTRIBUTE_THRESHOLD = 0.5  # probability above which the kiosk reports an attribute
GOLDEN_INPUTS = 4  # validation inputs shipped with their INT8 outputs for a device's self-test
GOLDEN_MIN_COSINE = 0.98  # a device's embedding of a golden input must be this close
TENSORRT_PATHS = ("onnx", "torch2trt")  # onnx: the kiosk builds its engine from the bundle


@dataclass
class ExportConfig:
    checkpoint: str
    data: str  # the training data: calibration photos from train, agreement measured on val
    out: str
    name: str = "storyscan"
    version: str = "1"
    calibration_photos: int = 256
    calibration: str = "minmax"
    fp32_convs: int = FP32_CONVS
    fp32_sensitive: int = FP32_SENSITIVE
    flip: bool = True  # average each photo with its mirror image inside the model
    min_agreement: float = MIN_AGREEMENT
    force: bool = False
    feature_weight: float = FEATURE_WEIGHT
    tensorrt: str = "onnx"  # or torch2trt: also ship a TensorRT engine converted here


def export_onnx(model: Recognizer | FlipAveraged, spec: InputSpec, path: Path) -> None:
    """FP32 ONNX with a dynamic batch axis and the model's named outputs (embedding, fine,
    coarse, and attributes when it has that head)."""
    model.eval()
    outputs = list(model.output_names)
    dummy = torch.zeros(1, 3, spec.size, spec.size)
    with warnings.catch_warnings():  # the legacy exporter's deprecation and folding notes
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", "Constant folding", UserWarning)
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["image"], output_names=outputs,
                          dynamic_axes={n: {0: "batch"} for n in ("image", *outputs)})
    onnx.checker.check_model(str(path))


def calibration_subset(split: Split, count: int, num_classes: int) -> Split:
    """Up to `count` photos spread evenly over products, so every product shapes the ranges."""
    by_class: list[list[int]] = [[] for _ in range(num_classes)]
    for i, f in enumerate(split.fine):
        by_class[f].append(i)
    picked: list[int] = []
    depth = 0
    while len(picked) < min(count, len(split)):
        for members in by_class:
            if depth < len(members) and len(picked) < count:
                picked.append(members[depth])
        depth += 1
    return split.subset(sorted(picked))


def kiosk_prototypes(model: Recognizer, runner: Recognizer | FlipAveraged, train: Split
                     ) -> np.ndarray:
    """One matching embedding per trained product ([fine, dim] float32): its learned prototype,
    joined, when the model has a feature weight, with the normalised mean of its training
    photos' pooled features as `runner` (the exported network) computes them."""
    protos = model.prototypes().detach().numpy()
    if not model.feature_weight:
        return protos.astype(np.float32)
    labels = np.array(train.fine)
    missing = sorted(set(range(len(protos))) - set(labels.tolist()))
    if missing:
        raise ExportError(f"{len(missing)} trained products have no training photos to "
                          "average their features over; export with --feature-weight 0")
    features = predict(runner, train.images)["embedding"][:, protos.shape[1]:]
    means = np.stack([features[labels == c].mean(0) for c in range(len(protos))])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    w = model.feature_weight
    return np.concatenate([np.sqrt(1 - w) * protos, np.sqrt(w) * means], 1).astype(np.float32)


def known_similarities(embeddings: np.ndarray, labels: np.ndarray, fine: list[str],
                       prototypes: np.ndarray, reference_skus: list[str],
                       references: np.ndarray) -> np.ndarray:
    """Best similarity of each photo the kiosk's matcher recognises correctly, searching what
    the kiosk searches: the prototypes and the catalog's reference photos (`reference_skus`,
    `references`: their products and embeddings). Prototypes alone score known products lower
    wherever a catalog photo is nearer, and set a threshold that lets unknown items through."""
    vectors = np.concatenate([prototypes, references.reshape(-1, prototypes.shape[1])])
    matcher = Matcher([*fine, *reference_skus], vectors, 1.0)
    best = [matcher.match(e, k=1)[0] for e in embeddings]
    return np.array([m.similarity for m, y in zip(best, labels, strict=True)
                     if m.sku == fine[y]], np.float64)


def calibrate_unknown(known: np.ndarray) -> dict[str, float]:
    """The manifest's unknown-threshold keys (none, like an older bundle, when INT8 recognises
    no validation photo: a bundle only --force writes)."""
    if not len(known):
        print("no unknown threshold: INT8 recognises none of the validation photos")
        return {}
    threshold = threshold_at_tar(known, UNKNOWN_TAR)
    print(f"unknown threshold: similarity {threshold:.4f} keeps {UNKNOWN_TAR:.0%} of the "
          f"{len(known)} validation photos INT8 recognises")
    return {"unknown_threshold": threshold, "unknown_tar": UNKNOWN_TAR}


def torch2trt_problem() -> str | None:
    """Why `--tensorrt torch2trt` cannot run on this machine, in one line; None when it can."""
    problems = []
    if importlib.util.find_spec("torch2trt") is None:
        problems.append("torch2trt is not installed (build it from source on the GPU "
                        "workstation or Jetson, see README)")
    if not torch.cuda.is_available():
        problems.append("torch sees no CUDA GPU")
    return "; ".join(problems) or None


def export_torch2trt(runner: Recognizer | FlipAveraged, calibration: list[np.ndarray],
                     val: list[np.ndarray], fp32_fine: np.ndarray, out_dir: Path
                     ) -> tuple[Path, dict, float]:
    """Convert the FP32 network with torch2trt on the GPU (INT8 calibrated on `calibration`,
    FP16 allowed, dynamic batch up to the kiosk's profile), write the serialized engine into
    `out_dir` under a name recording its TensorRT version and GPU; returns the file, its manifest
    entry and its top-1 agreement with FP32 (`fp32_fine`) on the validation photos `val`."""
    try:
        import tensorrt as trt
        from torch2trt import torch2trt
    except Exception as e:  # a broken tensorrt raises more than ImportError
        line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ExportError(f"--tensorrt torch2trt: torch2trt does not import ({line.strip()})"
                          ) from None
    from device.engines.tensorrt import MAX_BATCH, bundled_engine_name, gpu_identity

    gpu = gpu_identity()
    if gpu is None:
        raise ExportError("--tensorrt torch2trt: the CUDA driver sees no GPU")
    cuda = torch.device("cuda")
    net = copy.deepcopy(runner).float().to(cuda).eval()
    calib = [[torch.from_numpy(x[None]).to(cuda)] for x in calibration]  # batches of one
    names = list(runner.output_names)
    print(f"converting with torch2trt (TensorRT {trt.__version__} on {gpu}): INT8 calibrated on "
          f"{len(calib)} training photos, FP16 allowed, batches up to {MAX_BATCH}")
    try:
        with torch.no_grad():
            trt_net = torch2trt(net, calib[0], input_names=["image"], output_names=names,
                                fp16_mode=True, int8_mode=True, int8_calib_dataset=calib,
                                max_batch_size=MAX_BATCH)
            fine = np.concatenate([
                trt_net(torch.from_numpy(np.stack(val[i : i + MAX_BATCH])).to(cuda))
                [names.index("fine")].float().cpu().numpy()
                for i in range(0, len(val), MAX_BATCH)])
        engine = bytes(trt_net.engine.serialize())
    except Exception as e:  # torch2trt and TensorRT raise anything on an unsupported layer
        line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise ExportError(f"torch2trt could not convert the model ({line.strip()}); the "
                          "default --tensorrt onnx leaves the engine to the kiosk") from None
    agreement = float(np.mean(fine.argmax(1) == fp32_fine.argmax(1)))
    path = out_dir / bundled_engine_name(trt.__version__, gpu)
    path.write_bytes(engine)
    entry = {"file": path.name, "precision": "int8", "tensorrt": trt.__version__, "gpu": gpu,
             "builder": "torch2trt", "max_batch": MAX_BATCH}
    print(f"torch2trt engine: {path.name} ({len(engine) / 1e6:.1f} MB), top-1 agreement with "
          f"FP32 {agreement:.4f}")
    return path, entry, agreement


def export(cfg: ExportConfig) -> Bundle:
    if cfg.tensorrt not in TENSORRT_PATHS:
        raise ExportError(f"--tensorrt {cfg.tensorrt}: choose from {', '.join(TENSORRT_PATHS)}")
    if cfg.tensorrt == "torch2trt" and (problem := torch2trt_problem()):
        raise ExportError(f"--tensorrt torch2trt needs torch2trt and a CUDA GPU: {problem}")
    if cfg.fp32_convs < 0 or cfg.fp32_sensitive < 0:
        raise ExportError("--fp32-convs and --fp32-sensitive count convolutions: 0 or more")
    model, ckpt = load_checkpoint(cfg.checkpoint)
    if not 0.0 <= cfg.feature_weight < 1.0:
        raise ExportError(f"--feature-weight {cfg.feature_weight}: must be at least 0 and "
                          "below 1")
    model.feature_weight = cfg.feature_weight
    spec = InputSpec.from_dict(ckpt["input"])
    labels = ckpt["labels"]
    data_labels, train, val = read_layout(cfg.data)
    holdout = holdout_products(ckpt["config"].get("holdout", ""))
    if holdout:  # products the model was trained without stay out of calibration and checks
        data_labels, (train, val) = drop_products(data_labels, [train, val], holdout)
    if data_labels.fine != labels["fine"]:
        raise ExportError(f"{cfg.data}: its products differ from the ones {cfg.checkpoint} "
                          "was trained on")
    report, seen = IngestReport(), {}
    to_input = lambda img: prepare(img, spec)  # noqa: E731
    calib = load_split(calibration_subset(train, cfg.calibration_photos, len(labels["fine"])),
                       to_input, report, seen, "calibration photos")
    val = load_split(val, to_input, report, seen, "validation photos")
    references = load_split(read_references(cfg.data, data_labels), to_input, IngestReport(), {},
                            "catalog reference photos")
    # every training photo, for the products' mean features (calibration ones included)
    train = load_split(train, to_input, IngestReport(), {}, "training photos") \
        if cfg.feature_weight else None
    if not len(calib) or not len(val):
        raise ExportError(f"{cfg.data}: needs training photos to calibrate and validation "
                          f"photos to check INT8 ({report.summary()})")

    with tempfile.TemporaryDirectory() as tmp:
        fp32, int8, protos = Path(tmp) / "model_fp32.onnx", Path(tmp) / "model_int8.onnx", \
            Path(tmp) / "prototypes.npy"
        print(f"exporting ONNX FP32 (opset {OPSET})")
        runner = FlipAveraged(model) if cfg.flip else model
        export_onnx(runner, spec, fp32)
        print(f"calibrating INT8 on {len(calib)} training photos ({cfg.calibration})")
        options = QuantOptions(calibration=cfg.calibration, fp32_convs=cfg.fp32_convs,
                               fp32_sensitive=cfg.fp32_sensitive)
        sensitive = quantize_int8(fp32, int8, calib.images, options)[: cfg.fp32_sensitive]
        if train is not None:
            print(f"averaging product features over {len(train)} training photos "
                  f"(feature weight {cfg.feature_weight})")
        np.save(protos, kiosk_prototypes(model, runner, train))

        print(f"checking INT8 against FP32 on {len(val)} validation photos")
        y_fine, y_coarse = np.array(val.fine), np.array(val.coarse)
        engines = {p: OrtEngine(path, p) for p, path in (("fp32", fp32), ("int8", int8))}
        results = {p: infer_all(engine, val.images) for p, engine in engines.items()}
        metrics = {p: evaluate_scores(r["fine"], y_fine, r["coarse"], y_coarse).to_dict()
                   for p, r in results.items()}
        attribute_names = labels.get("attributes", [])
        if attribute_names:  # scored as the kiosk reports them
            targets = multi_hot(labels["attributes_of_fine"], len(attribute_names))[y_fine]
            for p, r in results.items():
                metrics[p]["attribute_micro_f1"] = micro_f1(
                    r[ATTRIBUTES] > logit(ATTRIBUTE_THRESHOLD), targets)
        agreement = float(np.mean(results["int8"]["fine"].argmax(1)
                                  == results["fp32"]["fine"].argmax(1)))
        cosine = float(np.mean(np.sum(results["int8"]["embedding"]
                                      * results["fp32"]["embedding"], axis=1)))
        metrics["int8_fp32_agreement"] = agreement
        metrics["int8_fp32_embedding_cosine"] = cosine
        metrics["val_photos"] = len(val)
        print(f"val product top-1: FP32 {metrics['fp32']['fine_top1']:.3f}, INT8 "
              f"{metrics['int8']['fine_top1']:.3f}; INT8/FP32 agreement {agreement:.4f}, "
              f"embedding cosine {cosine:.4f}"
              + (f"; attribute micro-F1: FP32 {metrics['fp32']['attribute_micro_f1']:.3f}, "
                 f"INT8 {metrics['int8']['attribute_micro_f1']:.3f}" if attribute_names else ""))
        if agreement < cfg.min_agreement and not cfg.force:
            raise ExportError(f"INT8 agrees with FP32 on {agreement:.1%} of validation photos, "
                              f"below --min-agreement {cfg.min_agreement:.1%}; bundle not "
                              "written (use --force to write it anyway)")
        files = {fp32.name: fp32, int8.name: int8, protos.name: protos}
        # golden inputs and their INT8 outputs: a device runs them after a release arrives and
        # refuses the bundle when its engine does not reproduce them (device/updates.py)
        golden = Path(tmp) / "golden"
        golden.mkdir()
        pick = np.linspace(0, len(val) - 1, num=min(GOLDEN_INPUTS, len(val))).astype(int)
        np.save(golden / "golden_inputs.npy", np.stack([val.images[i] for i in pick]))
        np.save(golden / "golden_embedding.npy", results["int8"]["embedding"][pick])
        files |= {f.name: f for f in sorted(golden.iterdir())}
        golden_section = {"golden": {"inputs": "golden_inputs.npy",
                                     "outputs": {"embedding": "golden_embedding.npy"},
                                     "precision": "int8", "min_cosine": GOLDEN_MIN_COSINE}}
        trt_section = {}
        if cfg.tensorrt == "torch2trt":
            engine, entry, trt_agreement = export_torch2trt(
                runner, calib.images, val.images, results["fp32"]["fine"], Path(tmp))
            metrics["torch2trt_fp32_agreement"] = trt_agreement
            if trt_agreement < cfg.min_agreement and not cfg.force:
                raise ExportError(f"the torch2trt engine agrees with FP32 on {trt_agreement:.1%} "
                                  f"of validation photos, below --min-agreement "
                                  f"{cfg.min_agreement:.1%}; bundle not written (use --force "
                                  "to write it anyway)")
            files[engine.name] = engine
            trt_section = {"tensorrt": {"engines": [entry]}}
        unknown = calibrate_unknown(known_similarities(
            results["int8"]["embedding"], y_fine, labels["fine"], load_array(protos),
            [labels["fine"][i] for i in references.fine],
            infer_all(engines["int8"], references.images).get("embedding", np.zeros(0))))
        manifest = {
            "name": cfg.name,
            "version": cfg.version,
            "architecture": ckpt["config"]["arch"],
            "input": spec.to_dict(),
            "heads": {
                "embedding": {"output": "embedding", "dim": model.embedding_dim,
                              "feature_weight": cfg.feature_weight},
                "fine": {"output": "fine", "labels": labels["fine"],
                         "prototypes": protos.name, "scale": float(ckpt["config"]["scale"]),
                         **unknown},
                "coarse": {"output": "coarse", "labels": labels["coarse"],
                           "of_fine": labels["coarse_of_fine"]},
                **({ATTRIBUTES: {"output": ATTRIBUTES, "labels": attribute_names,
                                 "threshold": ATTRIBUTE_THRESHOLD}} if attribute_names else {}),
            },
            "models": {"fp32": fp32.name, "int8": int8.name},
            "quantization": {**options.describe(), "calibration_photos": len(calib),
                             **({"sensitive_convolutions": sensitive} if sensitive else {})},
            "metrics": metrics,
            "training": {"epochs": ckpt["epoch"], "data": str(cfg.data)},
            "test_time": "flip-average" if cfg.flip else "none",
            **trt_section,
            **golden_section,
        }
        bundle = write_bundle(cfg.out, manifest, files)
    print(f"bundle written: {bundle.path} ({bundle.key})")
    return bundle
