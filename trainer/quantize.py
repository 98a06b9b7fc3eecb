"""INT8 quantisation of an exported FP32 ONNX model: ONNX Runtime static quantisation in QDQ
form, and the ranking of convolutions by how far their INT8 error moves the product scores.

No torch here: the kiosk's engines and this module need only ONNX Runtime. The sensitivity
ranking quantises the model once per convolution, the trials spread over worker processes
(`rank_convs`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    quant_pre_process,
    quantize_static,
)
from tqdm import tqdm

from device.engines import infer_all
from device.engines.ort import OrtEngine
from trainer.config import FP32_CONVS, FP32_SENSITIVE
from trainer.errors import ExportError

SENSITIVITY_STRIDE = 4  # every 4th calibration photo scores a convolution's INT8 error
# Each trial re-quantises every weight in ONNX Runtime's Python quantiser, one channel at a
# time: 1.5 s a trial on a Lite0, 95% of it in quantize_static, so trials run in parallel
RANK_WORKERS = 8  # at most, and at most one per core
CALIBRATION_METHODS = {"minmax": CalibrationMethod.MinMax,
                       "entropy": CalibrationMethod.Entropy,
                       "percentile": CalibrationMethod.Percentile}


class _Calibration(CalibrationDataReader):
    def __init__(self, inputs: list[np.ndarray], batch: int = 16) -> None:
        self.batches = iter([np.stack(inputs[i : i + batch]) for i in range(0, len(inputs), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.batches, None)
        return None if x is None else {"image": x}


@dataclass(frozen=True)
class QuantOptions:
    """How the INT8 model is made; the defaults are what `storyscan export` ships."""

    calibration: str = "minmax"  # minmax | percentile | entropy
    # uint8 activations with a zero point: faster and closer to FP32 on ONNX Runtime's CPU
    # kernels (bench/int8_fidelity.py); symmetric int8 is the form TensorRT needs
    symmetric_activations: bool = False
    per_channel: bool = True  # one weight scale per output channel
    # weights in 7 bits (-64..63). On x86 CPUs without VNNI (AVX2 only, e.g. AMD Zen 1-3)
    # ONNX Runtime multiplies uint8 activations by int8 weights in pairs summed into int16,
    # which can saturate with 8-bit weights and cannot with 7; but on a Lite2 model, on such a
    # CPU, 7 bits lost 2.3 pp top-1 where saturation cost none (bench/int8_fidelity.py): off
    reduce_range: bool = False
    fp32_convs: int = FP32_CONVS  # leading convolutions kept in FP32 (where INT8 hurts most)
    # and the N later convolutions whose INT8 error moves the product scores most
    # (rank_convs: measured on calibration photos, one at a time)
    fp32_sensitive: int = FP32_SENSITIVE
    # depthwise convolutions kept in FP32 (one filter per channel meets one activation scale
    # for all channels): 98.6% agreement on a Lite2 model, but INT8 at 0.90 of FP32 time, each
    # one a round trip out of INT8 (bench/int8_fidelity.py); not exported
    fp32_depthwise: bool = False

    def describe(self) -> dict:
        fp32 = (([f"first {self.fp32_convs} convolutions"] if self.fp32_convs else [])
                + ([f"the {self.fp32_sensitive} most sensitive convolutions"]
                   if self.fp32_sensitive else [])
                + (["depthwise convolutions"] if self.fp32_depthwise else []))
        return {"format": "QDQ",
                "weights": f"int{7 if self.reduce_range else 8} "
                           f"{'per-channel' if self.per_channel else 'per-tensor'} symmetric",
                "activations": "int8 symmetric" if self.symmetric_activations
                else "uint8 asymmetric",
                "calibration": self.calibration,
                "fp32_layers": ", ".join(fp32) + (" and " if fp32 else "") + "the heads"}


def fp32_nodes(model: onnx.ModelProto, options: QuantOptions) -> list[str]:
    """Nodes kept in FP32: the first `fp32_convs` convolutions, the depthwise ones if asked,
    and everything from the global pooling on (every head, the attribute head too), so
    embeddings stay precise."""
    nodes = model.graph.node
    pools = [i for i, n in enumerate(nodes) if n.op_type == "GlobalAveragePool"]
    if not pools:
        raise ExportError("exported network has no GlobalAveragePool: cannot find its heads")
    convs = [n for n in nodes if n.op_type == "Conv"]
    keep = [n.name for n in convs[: options.fp32_convs]]
    if options.fp32_depthwise:
        keep += [n.name for n in convs[options.fp32_convs :] if any(
            a.name == "group" and a.i > 1 for a in n.attribute)]
    return keep + [n.name for n in nodes[pools[0]:]]


def quantize_int8(fp32: Path, out: Path, calibration: list[np.ndarray],
                  options: QuantOptions, ranking: list[str] | None = None) -> list[str]:
    """Write the INT8 model of `fp32` to `out`, its activation ranges calibrated on
    `calibration`. With `options.fp32_sensitive`, returns the other convolutions ranked by
    sensitivity, most first (`rank_convs`; the first `fp32_sensitive` stay FP32); a `ranking`
    from an earlier call with the same photos and options is used instead of ranking again."""
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        ranges = Path(tmp) / "ranges.json"  # calibrated once, reused by every trial model
        keep = fp32_nodes(onnx.load(str(pre)), options)
        if options.fp32_sensitive and ranking is None:
            ranking = rank_convs(pre, calibration, ranges, keep, options)
        ranking = ranking or []
        _quantize(pre, out, calibration, ranges, keep + ranking[: options.fp32_sensitive],
                  options)
        return ranking


def _quantize(pre: Path, out: Path, calibration: list[np.ndarray], ranges: Path,
              keep: list[str], options: QuantOptions) -> None:
    quantize_static(str(pre), str(out),
                    None if ranges.is_file() else _Calibration(calibration),
                    quant_format=QuantFormat.QDQ, per_channel=options.per_channel,
                    activation_type=QuantType.QInt8 if options.symmetric_activations
                    else QuantType.QUInt8,
                    weight_type=QuantType.QInt8, reduce_range=options.reduce_range,
                    nodes_to_exclude=keep,
                    calibrate_method=CALIBRATION_METHODS[options.calibration],
                    extra_options={"ActivationSymmetric": options.symmetric_activations,
                                   "WeightSymmetric": True},
                    calibration_cache_path=str(ranges))


def score_divergence(reference: np.ndarray, scores: np.ndarray) -> float:
    """Mean KL divergence of the product probabilities `scores` from `reference` (logits):
    how far INT8 moves the model's answer, smooth where top-1 agreement only counts flips."""
    def log_softmax(z: np.ndarray) -> np.ndarray:
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))

    p, q = log_softmax(reference.astype(np.float64)), log_softmax(scores.astype(np.float64))
    return float(np.mean(np.sum(np.exp(p) * (p - q), 1)))


@dataclass(frozen=True)
class _Trials:
    """What every sensitivity trial shares: the model, its calibrated ranges, what stays FP32
    anyway, and the probe photos with FP32's scores on them."""

    pre: Path
    ranges: Path
    keep: list[str]
    options: QuantOptions
    probe: list[np.ndarray]
    reference: np.ndarray
    threads: int  # ONNX Runtime threads of each trial's engine


_trials: _Trials | None = None  # a rank_convs worker's share, set once as it starts


def _start_trials(trials: _Trials) -> None:
    global _trials
    _trials = trials


def _trial_divergence(t: _Trials, extra: list[str]) -> float:
    """The INT8 model's score divergence from FP32 with `extra` convolutions back in FP32."""
    with tempfile.TemporaryDirectory(dir=t.pre.parent) as tmp:
        # a copy of its own: ONNX Runtime writes a shape-inferred model beside its input
        pre, trial = Path(tmp) / t.pre.name, Path(tmp) / "trial.onnx"
        shutil.copyfile(t.pre, pre)
        _quantize(pre, trial, [], t.ranges, t.keep + extra, t.options)
        scores = infer_all(OrtEngine(trial, "int8", threads=t.threads), t.probe)["fine"]
    return score_divergence(t.reference, scores)


def _one_conv(conv: str) -> float:
    assert _trials is not None, "a rank_convs worker runs after _start_trials"
    return _trial_divergence(_trials, [conv])


def rank_convs(pre: Path, calibration: list[np.ndarray], ranges: Path, keep: list[str],
               options: QuantOptions, workers: int = 0) -> list[str]:
    """The convolutions not in `keep`, those whose INT8 error moves the product scores most
    first. Each in turn is put back in FP32 and the INT8 model's scores on every
    `SENSITIVITY_STRIDE`th calibration photo compared with FP32's (`score_divergence`): the
    more its return brings the divergence down, the higher it ranks. Measured one at a time on
    training photos, never on the validation photos the bundle is checked on. The trials run
    in `workers` processes (0: one per core, at most `RANK_WORKERS`); 1 runs them here."""
    probe = calibration[::SENSITIVITY_STRIDE]
    reference = infer_all(OrtEngine(pre, "fp32"), probe)["fine"]
    convs = [n.name for n in onnx.load(str(pre)).graph.node
             if n.op_type == "Conv" and n.name not in keep]
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count()) or 1  # the cores this process may use (Linux), or all
    workers = max(1, min(workers or min(cores, RANK_WORKERS), len(convs)))
    trials = _Trials(pre, ranges, keep, options, probe, reference,
                     threads=0 if workers == 1 else max(1, cores // workers))
    base_model = pre.with_name("int8.onnx")
    _quantize(pre, base_model, calibration, ranges, keep, options)  # calibrates: writes `ranges`
    base = score_divergence(reference, infer_all(OrtEngine(base_model, "int8"), probe)["fine"])
    progress = {"desc": "INT8 sensitivity", "unit": "conv", "total": len(convs), "leave": False}
    if workers == 1:
        divergence = [_trial_divergence(trials, [c]) for c in tqdm(convs, **progress)]
    else:  # spawned, not forked: a fork of this process, which already runs ONNX Runtime's
        # and torch's threads, can inherit a lock held by a thread the child lacks and hang
        # for ever (a CI run stalled here, in test_int8). A spawned worker starts clean: it
        # imports this module (ONNX Runtime and numpy, never torch) and the guarded __main__
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                                 initializer=_start_trials, initargs=(trials,)) as pool:
            divergence = list(tqdm(pool.map(_one_conv, convs), **progress))
    gain = {c: base - d for c, d in zip(convs, divergence, strict=True)}
    ranking = sorted(convs, key=gain.__getitem__, reverse=True)
    print(f"INT8 score divergence on {len(probe)} calibration photos: {base:.2e}; kept in "
          f"FP32 as the most sensitive: {', '.join(ranking[: options.fp32_sensitive])}")
    return ranking
