"""INT8 models run as the exporter wrote them: a layer the bundle keeps in FP32 is computed
in FP32 on the kiosk's engine, not quietly re-quantised by ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from device.engines.ort import OrtEngine
from trainer.quantize import (
    QuantOptions,
    fp32_nodes,
    quantize_int8,
    rank_convs,
    score_divergence,
)

SIZE = 16
# 7-bit weights in these tests: on a CPU without VNNI (AVX2 only) ONNX Runtime sums pairs of
# uint8 x int8 products in int16, which 8-bit weights can saturate (this network's: its
# embedding 15% of its range off the graph as written, and conv_a ranked most sensitive), an
# error of that CPU's kernel and not of what is tested; 7 bits cannot saturate anywhere
EXACT = {"reduce_range": True}


def small_network(path: Path, lopsided_last: bool = False) -> None:
    """A recognizer in miniature: 1x1 conv, ReLU6, depthwise 3x3, ReLU6, 1x1 conv, pooling,
    and three linear heads. One depthwise filter is far larger than the rest (BatchNorm folding
    leaves such filters in trained networks) and ReLU6 clips its output, so one weight scale
    for the whole layer would round the other filters to a level or two. With
    `lopsided_last`, one input weight of every filter of the last convolution dwarfs the
    others, which a scale per filter cannot help: that layer loses the most to INT8."""
    rng = np.random.default_rng(0)
    spread = np.ones((16, 1, 1, 1), np.float32)
    spread[0] = 50  # one filter far larger than the rest, its output clipped by ReLU6
    weights = {
        "wa": rng.standard_normal((16, 3, 1, 1)).astype(np.float32) * 0.5,
        "wb": rng.standard_normal((16, 1, 3, 3)).astype(np.float32) * spread,
        "wc": rng.standard_normal((32, 16, 1, 1)).astype(np.float32) * 0.3,
        "we": rng.standard_normal((32, 8)).astype(np.float32),
        "wf": rng.standard_normal((32, 5)).astype(np.float32),
        "wg": rng.standard_normal((32, 3)).astype(np.float32),
        "lo": np.array(0, np.float32), "hi": np.array(6, np.float32),
    }
    if lopsided_last:  # within each filter one weight dwarfs the rest: INT8 hurts here most
        weights["wc"][:, 1] *= 20
    nodes = [
        helper.make_node("Conv", ["image", "wa"], ["a"], name="conv_a"),
        helper.make_node("Clip", ["a", "lo", "hi"], ["a6"], name="relu6_a"),
        helper.make_node("Conv", ["a6", "wb"], ["b"], name="conv_b", group=16, pads=[1] * 4),
        helper.make_node("Clip", ["b", "lo", "hi"], ["b6"], name="relu6_b"),
        helper.make_node("Conv", ["b6", "wc"], ["c"], name="conv_c"),
        helper.make_node("GlobalAveragePool", ["c"], ["pooled"], name="pool"),
        helper.make_node("Flatten", ["pooled"], ["features"]),
        helper.make_node("MatMul", ["features", "we"], ["embedding"]),
        helper.make_node("MatMul", ["features", "wf"], ["fine"]),
        helper.make_node("MatMul", ["features", "wg"], ["coarse"]),
    ]
    graph = helper.make_graph(
        nodes, "small",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["batch", d])
         for n, d in (("embedding", 8), ("fine", 5), ("coarse", 3))],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def calibration_photos() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.uniform(-1, 1, (3, SIZE, SIZE)).astype(np.float32) for _ in range(32)]


def outputs(session: ort.InferenceSession, x: np.ndarray) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"image": x}), strict=True))


def test_fp32_layers_of_an_int8_model_run_in_fp32(tmp_path: Path) -> None:
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    small_network(fp32)
    photos = calibration_photos()
    # the depthwise convolution stays FP32 between two INT8 ones
    quantize_int8(fp32, int8, photos,
                  QuantOptions(fp32_convs=0, fp32_sensitive=0, fp32_depthwise=True, **EXACT))
    x = np.stack(photos[:8])
    plain = ort.SessionOptions()
    plain.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    as_written = outputs(ort.InferenceSession(str(int8), plain,
                                              providers=["CPUExecutionProvider"]), x)
    requantised = outputs(ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"]), x)
    kiosk = OrtEngine(int8, "int8").infer(x)

    def gap(out: dict[str, np.ndarray]) -> float:
        """Largest embedding difference from the graph as written, relative to its range."""
        ref = as_written["embedding"]
        return float(np.abs(out["embedding"] - ref).max() / np.abs(ref).max())

    assert gap(kiosk) < 1e-3
    assert gap(requantised) > 0.05  # what the kiosk would compute with the pass left on


def test_export_keeps_the_convolution_int8_hurts_most_in_fp32(tmp_path: Path) -> None:
    fp32, int8 = tmp_path / "fp32.onnx", tmp_path / "int8.onnx"
    small_network(fp32, lopsided_last=True)
    photos = calibration_photos()
    options = QuantOptions(fp32_convs=0, fp32_sensitive=1, **EXACT)
    assert quantize_int8(fp32, int8, photos, options)[0] == "conv_c"  # ranked first
    assert options.describe()["fp32_layers"] == "the 1 most sensitive convolutions and the heads"
    graph = onnx.load(str(int8)).graph
    produced_by = {out: n.op_type for n in graph.node for out in n.output}
    float_weights = {n.name for n in graph.node if n.op_type == "Conv"
                     and produced_by.get(n.input[1]) != "DequantizeLinear"}
    assert float_weights == {"conv_c"}

    x = np.stack(photos)
    reference = OrtEngine(fp32, "fp32").infer(x)["fine"]
    all_int8 = tmp_path / "all.onnx"
    quantize_int8(fp32, all_int8, photos,
                  QuantOptions(fp32_convs=0, fp32_sensitive=0, **EXACT))
    assert score_divergence(reference, OrtEngine(int8, "int8").infer(x)["fine"]) < \
        score_divergence(reference, OrtEngine(all_int8, "int8").infer(x)["fine"]) / 2


def test_sensitivity_trials_rank_alike_in_worker_processes(tmp_path: Path) -> None:
    """rank_convs spreads its trials (one quantisation each) over processes: each trial must
    score as it does in one process, or the convolutions kept in FP32 would depend on the
    workstation's cores."""
    fp32 = tmp_path / "fp32.onnx"
    small_network(fp32, lopsided_last=True)
    photos = calibration_photos()
    options = QuantOptions(fp32_convs=0, fp32_sensitive=1, **EXACT)
    keep = fp32_nodes(onnx.load(str(fp32)), options)
    here, spread = (rank_convs(fp32, photos, tmp_path / f"ranges-{workers}.json", keep,
                               options, workers=workers) for workers in (1, 3))
    assert here == spread and len(here) == 3 and here[0] == "conv_c"


def test_score_divergence() -> None:
    scores = np.array([[2.0, 0.0, -1.0], [0.0, 3.0, 0.0]])
    assert score_divergence(scores, scores) == 0.0
    assert score_divergence(scores, scores + 5.0) < 1e-12  # a shift leaves probabilities
    assert score_divergence(scores, scores[:, ::-1]) > 0.5
