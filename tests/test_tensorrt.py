"""TensorRT: the engine itself where `tensorrt` imports and a CUDA GPU is present (skipped
elsewhere, with the reason), and on every machine the pieces that need neither: the engine
cache key, the rewrite of the bundle's INT8 model into TensorRT's explicit quantisation (run in
ONNX Runtime to show it still computes the model), the backend choice and the one-line
refusals on a machine without TensorRT. TensorRT is never mocked.

The bundle here is small and real: EfficientNet-Lite0 (ImageNet weights, untrained heads) at
64 px, exported and INT8-quantised by the trainer's own functions, in seconds.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from device.engines import EngineError, open_engine, pick_backend
from device.engines.ort import OrtEngine
from device.engines.tensorrt import (
    TrtEngine,
    bundled_engine_name,
    engine_key,
    tensorrt_qdq,
    timing_cache_name,
    unavailable,
)
from models.bundle import MANIFEST, Bundle, BundleError, load_bundle, write_bundle
from tests.conftest import storyscan

WHY_NO_TENSORRT = unavailable()
needs_tensorrt = pytest.mark.skipif(WHY_NO_TENSORRT is not None, reason=str(WHY_NO_TENSORRT))
without_tensorrt = pytest.mark.skipif(
    WHY_NO_TENSORRT is None, reason="TensorRT runs here: its refusals are for machines without it")

SIZE = 64
INT8_TOLERANCE = 0.4  # relative error of an INT8 output (see the rewrite test)
FINE = ["plate", "bowl", "vase", "jug", "ring", "brooch", "shirt", "scarf"]
COARSE, OF_FINE = ["tableware", "vases", "jewellery", "clothing"], [0, 0, 1, 1, 2, 2, 3, 3]


@dataclass(frozen=True)
class Tiny:
    bundle: Bundle
    runner: object  # the exported torch network (FlipAveraged), for torch2trt
    calibration: list[np.ndarray]
    inputs: np.ndarray  # 9 prepared inputs, not used for calibration


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    torch = pytest.importorskip("torch")
    from models.recognizer import FlipAveraged, build_recognizer, input_spec
    from trainer.export import export_onnx
    from trainer.quantize import QuantOptions, quantize_int8

    torch.manual_seed(0)
    model = build_recognizer("efficientnet_lite0", len(FINE), len(COARSE), weights="imagenet",
                             embed_dim=32).eval()
    runner = FlipAveraged(model)
    spec = input_spec("efficientnet_lite0", SIZE)
    src = tmp_path_factory.mktemp("tiny-src")
    rng = np.random.default_rng(0)
    calibration = list(rng.normal(size=(16, 3, SIZE, SIZE)).astype(np.float32))
    export_onnx(runner, spec, src / "model_fp32.onnx")
    quantize_int8(src / "model_fp32.onnx", src / "model_int8.onnx", calibration, QuantOptions())
    np.save(src / "prototypes.npy", model.prototypes().detach().numpy())
    manifest = {
        "name": "tiny", "version": "1", "architecture": "efficientnet_lite0",
        "input": spec.to_dict(),
        "heads": {"embedding": {"output": "embedding", "dim": 32},
                  "fine": {"output": "fine", "labels": FINE, "prototypes": "prototypes.npy",
                           "scale": 16.0},
                  "coarse": {"output": "coarse", "labels": COARSE, "of_fine": OF_FINE}},
        "models": {"fp32": "model_fp32.onnx", "int8": "model_int8.onnx"},
        "metrics": {},
    }
    files = {name: src / name for name in ("model_fp32.onnx", "model_int8.onnx",
                                           "prototypes.npy")}
    bundle = write_bundle(tmp_path_factory.mktemp("tiny") / "bundle", manifest, files)
    inputs = rng.normal(size=(9, 3, SIZE, SIZE)).astype(np.float32)
    return Tiny(bundle, runner, calibration, inputs)


def assert_close(ours: dict, reference: dict, tolerance: float) -> None:
    """Every output within `tolerance` relative error (over the batch: the untrained 2-class
    head's logits are too small for a per-photo measure)."""
    assert set(ours) == set(reference)
    for name, expected in reference.items():
        assert ours[name].shape == expected.shape, name
        error = np.linalg.norm(ours[name] - expected) / np.linalg.norm(expected)
        assert error < tolerance, f"{name}: relative error {error:.4f}"


# --- on every machine --------------------------------------------------------------------------


def test_engine_key_changes_with_each_of_its_parts() -> None:
    base = ("10.3.0", "Orin sm_87 8SM", "ab" * 32, "int8", 32)
    key = engine_key(*base)
    assert key == engine_key(*base)  # a pure function of its parts
    others = [("10.3.1", *base[1:]), (base[0], "Orin sm_87 16SM", *base[2:]),
              (*base[:2], "ac" * 32, *base[3:]), (*base[:3], "fp16", base[4]), (*base[:4], 8)]
    keys = {key, *(engine_key(*o) for o in others)}
    assert len(keys) == len(others) + 1
    # names that clean up alike still differ; every key is a plain file name
    assert engine_key("10.3", "A B", "c" * 64, "int8") != engine_key("10.3", "A_B", "c" * 64,
                                                                     "int8")
    gpu = "NVIDIA GeForce RTX 4090/ sm_89 128SM"
    for name in (engine_key("10.3.0", gpu, "d" * 64, "fp16"), timing_cache_name("10.3.0", gpu),
                 bundled_engine_name("10.3.0", gpu)):
        assert Path(name).name == name and " " not in name and "/" not in name
    assert timing_cache_name("10.3.0", gpu) != timing_cache_name("10.4.0", gpu)
    assert bundled_engine_name("10.3.0", gpu) != bundled_engine_name("10.3.0", "Orin sm_87 8SM")


def quantize_graph(zero_point: np.ndarray, scale: float) -> onnx.ModelProto:
    """x -> QuantizeLinear -> DequantizeLinear -> y, as ONNX Runtime writes an activation."""
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], name="q"),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
        [numpy_helper.from_array(np.array(scale, np.float32), "s"),
         numpy_helper.from_array(zero_point, "z")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def test_rewrite_keeps_the_clamp_of_a_relu_the_quantisation_absorbed(tmp_path: Path) -> None:
    # ONNX Runtime drops a ReLU6 before uint8 Q/DQ with range [0, 6]: the clamp lives in the
    # quantisation. TensorRT's symmetric int8 reaches -6, so the rewrite must clamp itself.
    scale = 6 / 255
    onnx.save(quantize_graph(np.array(0, np.uint8), scale), tmp_path / "relu6.onnx")
    assert tensorrt_qdq(tmp_path / "relu6.onnx", tmp_path / "trt.onnx")["activations"] == 1
    x = np.linspace(-3, 8, 221, dtype=np.float32)
    before, after = run_onnx(tmp_path / "relu6.onnx", x), run_onnx(tmp_path / "trt.onnx", x)
    assert before.min() == 0 and after.min() == 0 and after[x < 0].max() == 0
    assert np.isclose(after.max(), 6, atol=1e-5)
    clamped = np.clip(x, 0, 6)
    assert np.abs(before - clamped).max() <= scale / 2 + 1e-6  # half a uint8 step
    assert np.abs(after - clamped).max() <= 6 / 127 / 2 + 1e-6  # half a symmetric int8 step
    nodes = onnx.load(tmp_path / "trt.onnx").graph
    zero_points = [numpy_helper.to_array(t) for t in nodes.initializer if "zero_point" in t.name]
    assert zero_points and all(z.dtype == np.int8 and not z.any() for z in zero_points)

    # already TensorRT's form: left alone
    onnx.save(quantize_graph(np.array(0, np.int8), 0.05), tmp_path / "sym.onnx")
    assert tensorrt_qdq(tmp_path / "sym.onnx", tmp_path / "sym-trt.onnx")["activations"] == 0
    x = np.linspace(-7, 7, 57, dtype=np.float32)
    np.testing.assert_array_equal(run_onnx(tmp_path / "sym.onnx", x),
                                  run_onnx(tmp_path / "sym-trt.onnx", x))


def test_bundle_int8_model_rewritten_for_tensorrt_is_symmetric_and_computes_the_model(
        tiny: Tiny, tmp_path: Path) -> None:
    out = tmp_path / "trt.onnx"
    changed = tensorrt_qdq(tiny.bundle.model_path("int8"), out)
    assert changed["activations"] > 0 and changed["weights"] > 0
    model = onnx.load(out)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zero_point = inits[node.input[2]]
            assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        if node.op_type == "DequantizeLinear":  # fed by a Q, never by stored integers
            assert node.input[0] not in inits, node.name
    assert not any(a.dtype in (np.uint8, np.int32) for a in inits.values())

    fp32 = OrtEngine(tiny.bundle.model_path("fp32"), "fp32").infer(tiny.inputs)
    int8 = OrtEngine(tiny.bundle.model_path("int8"), "int8").infer(tiny.inputs)
    rewritten = OrtEngine(out, "int8").infer(tiny.inputs)
    # INT8 of an untrained model at 64 px is coarse: relative errors of 0.1 to 0.25 here; a
    # wrong rewrite is far off (without the clamps: above 1)
    assert_close(int8, fp32, INT8_TOLERANCE)  # the bundle's own INT8, for scale
    assert_close(rewritten, fp32, INT8_TOLERANCE)
    assert_close(rewritten, int8, INT8_TOLERANCE)


def test_bundle_with_a_tensorrt_engine_entry_loads_and_its_file_is_hash_checked(
        tiny: Tiny, tmp_path: Path) -> None:
    fake = tmp_path / "engine.bin"
    fake.write_bytes(b"serialized engine " * 32)
    name = bundled_engine_name("10.3.0", "Orin sm_87 8SM")
    manifest = {k: v for k, v in tiny.bundle.manifest.items()
                if k not in ("schema_version", "created", "files")}
    sources = {n: tiny.bundle.path / n for n in tiny.bundle.manifest["files"]}
    entry = {"file": name, "precision": "int8", "tensorrt": "10.3.0", "gpu": "Orin sm_87 8SM"}
    b = write_bundle(tmp_path / "b", {**manifest, "tensorrt": {"engines": [entry]}},
                     {**sources, name: fake})
    assert b.manifest["files"][name]["bytes"] == fake.stat().st_size
    (b.path / name).write_bytes(b"serialized enGine " * 32)  # same size, one byte off
    with pytest.raises(BundleError, match="does not match its sha256"):
        load_bundle(b.path)

    for bad, phrase in (({**entry, "file": "other.engine"}, "does not list it under 'files'"),
                        ({k: v for k, v in entry.items() if k != "gpu"}, "entries need")):
        with pytest.raises(BundleError, match=phrase):
            write_bundle(tmp_path / "bad", {**manifest, "tensorrt": {"engines": [bad]}},
                         {**sources, name: fake})


@without_tensorrt
def test_auto_picks_onnx_runtime_here(tiny: Tiny) -> None:
    assert pick_backend("auto") == "onnxruntime"
    engine = open_engine(tiny.bundle)
    assert (engine.backend, engine.precision) == ("onnxruntime", "int8")
    expected = OrtEngine(tiny.bundle.model_path("int8"), "int8").infer(tiny.inputs[:2])
    for name, value in engine.infer(tiny.inputs[:2]).items():
        np.testing.assert_array_equal(value, expected[name])


@without_tensorrt
def test_tensorrt_asked_for_here_is_refused_with_the_reason_in_one_line(tiny: Tiny) -> None:
    for attempt in (lambda: open_engine(tiny.bundle, backend="tensorrt"),
                    lambda: TrtEngine(tiny.bundle, "int8")):
        with pytest.raises(EngineError) as info:
            attempt()
        assert str(info.value) == f"TensorRT engine unavailable: {WHY_NO_TENSORRT}"
        assert "\n" not in str(info.value)


def test_fp16_is_refused_by_onnx_runtime_and_unknown_precisions_everywhere(tiny: Tiny) -> None:
    with pytest.raises(EngineError, match="fp16 runs on the TensorRT engine only"):
        open_engine(tiny.bundle, backend="onnxruntime", precision="fp16")
    with pytest.raises(EngineError, match="unknown precision 'int4'"):
        open_engine(tiny.bundle, precision="int4")
    with pytest.raises(EngineError, match="unknown engine backend 'cuda'"):
        open_engine(tiny.bundle, backend="cuda")


@without_tensorrt
def test_fp16_scan_here_fails_with_one_line(tiny: Tiny, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    from device.cli import main

    with pytest.raises(EngineError, match=r"fp16 runs on the TensorRT engine only.*here: "):
        open_engine(tiny.bundle, precision="fp16")  # auto here is ONNX Runtime
    code = main(["scan", str(tmp_path / "photo.jpg"), "--bundle", str(tiny.bundle.path),
                 "--catalog", str(tmp_path / "shop.db"), "--precision", "fp16"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("storyscan: error: fp16 runs on the TensorRT engine only")
    assert err.count("\n") == 1


def test_export_torch2trt_without_torch2trt_or_cuda_fails_with_one_line(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from trainer.export import torch2trt_problem

    if torch2trt_problem() is None:
        pytest.skip("torch2trt and a CUDA GPU are present: the export would run")
    r = storyscan("export", tmp_path / "best.pt", "--data", tmp_path / "data", "--out",
                  tmp_path / "bundle", "--tensorrt", "torch2trt")
    assert r.returncode == 1
    assert r.stderr.startswith("storyscan: error: --tensorrt torch2trt needs torch2trt and a "
                               "CUDA GPU: ")
    assert r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "bundle").exists()


# --- where TensorRT runs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def built(tiny: Tiny, tmp_path_factory: pytest.TempPathFactory) -> TrtEngine:
    """The INT8 engine built once (profile up to 4, so 9 inputs run in three parts)."""
    if WHY_NO_TENSORRT:
        pytest.skip(WHY_NO_TENSORRT)
    return TrtEngine(tiny.bundle, "int8", cache_dir=tmp_path_factory.mktemp("engines"),
                     max_batch=4)


@needs_tensorrt
@pytest.mark.slow
def test_int8_engine_built_from_the_bundle_matches_onnx_runtime(tiny: Tiny, built: TrtEngine,
                                                                 tmp_path: Path) -> None:
    assert (built.backend, built.precision, built.source) == ("tensorrt", "int8", "built")
    assert built.path.is_file() and built.timing_path.is_file()
    assert built.max_batch == 4
    ours = built.infer(tiny.inputs)  # 9 inputs: batches of 4, 4 and 1
    tensorrt_qdq(tiny.bundle.model_path("int8"), tmp_path / "trt.onnx")
    same_quantisation = OrtEngine(tmp_path / "trt.onnx", "int8").infer(tiny.inputs)
    fp32 = OrtEngine(tiny.bundle.model_path("fp32"), "fp32").infer(tiny.inputs)
    assert_close(ours, same_quantisation, INT8_TOLERANCE)
    assert_close(ours, fp32, INT8_TOLERANCE)
    one = built.infer(tiny.inputs[:1])
    assert_close(one, {k: v[:1] for k, v in ours.items()}, 0.1)


@needs_tensorrt
@pytest.mark.slow
def test_second_open_loads_the_cached_engine(tiny: Tiny, built: TrtEngine) -> None:
    stamp = built.path.stat().st_mtime_ns
    again = TrtEngine(tiny.bundle, "int8", cache_dir=built.cache_dir, max_batch=4)
    assert again.source == "cache" and again.path == built.path
    assert built.path.stat().st_mtime_ns == stamp
    assert_close(again.infer(tiny.inputs), built.infer(tiny.inputs), 1e-3)


@needs_tensorrt
@pytest.mark.slow
def test_engine_of_another_key_or_a_corrupt_one_is_rebuilt(tiny: Tiny, built: TrtEngine,
                                                           tmp_path: Path) -> None:
    # after a TensorRT upgrade the old engine sits under the old version's key: never loaded
    stale = tmp_path / f"{engine_key('0.0.1', built.gpu, tiny.bundle.digest, 'int8', 4)}.engine"
    shutil.copyfile(built.path, stale)
    upgraded = TrtEngine(tiny.bundle, "int8", cache_dir=tmp_path, max_batch=4)
    assert upgraded.source == "built" and upgraded.path != stale and upgraded.path.is_file()
    # an engine file that no longer deserialises is rebuilt and replaced
    upgraded.path.write_bytes(b"not an engine")
    rebuilt = TrtEngine(tiny.bundle, "int8", cache_dir=tmp_path, max_batch=4)
    assert rebuilt.source == "built" and rebuilt.path.stat().st_size > 100
    assert_close(rebuilt.infer(tiny.inputs), built.infer(tiny.inputs), INT8_TOLERANCE)


@needs_tensorrt
@pytest.mark.slow
def test_fp16_engine_and_auto_choice(tiny: Tiny, tmp_path: Path) -> None:
    assert pick_backend("auto") == "tensorrt"
    engine = open_engine(tiny.bundle, precision="fp16", cache_dir=tmp_path)
    assert (engine.backend, engine.precision) == ("tensorrt", "fp16")
    fp32 = OrtEngine(tiny.bundle.model_path("fp32"), "fp32").infer(tiny.inputs)
    assert_close(engine.infer(tiny.inputs), fp32, 0.05)  # torch in FP16 here: under 0.01


@needs_tensorrt
@pytest.mark.slow
def test_torch2trt_engine_in_the_bundle_is_used_on_the_same_tensorrt_and_gpu(
        tiny: Tiny, tmp_path: Path) -> None:
    pytest.importorskip("torch2trt", reason="torch2trt not installed (built from source)")
    from trainer.export import export_torch2trt

    fp32 = OrtEngine(tiny.bundle.model_path("fp32"), "fp32").infer(tiny.inputs)
    engine_file, entry, agreement = export_torch2trt(
        tiny.runner, tiny.calibration, list(tiny.inputs), fp32["fine"], tmp_path)
    assert 0 <= agreement <= 1
    manifest = json.loads((tiny.bundle.path / MANIFEST).read_text())
    manifest = {k: v for k, v in manifest.items() if k not in ("schema_version", "created",
                                                                "files")}
    sources = {n: tiny.bundle.path / n for n in tiny.bundle.manifest["files"]}
    b = write_bundle(tmp_path / "b", {**manifest, "tensorrt": {"engines": [entry]}},
                     {**sources, engine_file.name: engine_file})
    engine = TrtEngine(b, "int8", cache_dir=tmp_path / "cache")
    assert engine.source == "bundle"
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert_close(engine.infer(tiny.inputs), fp32, INT8_TOLERANCE)
