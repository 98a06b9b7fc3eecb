"""The training recipe's switches: each does what it says, and a run with all of them works."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.augment import camera_shift, random_erasing, random_resized_crop
from trainer.config import CPU_BF16_FROM_PX, TrainConfig
from trainer.errors import DataError
from trainer.ingest import Split, drop_products, read_layout, read_references
from trainer.synthetic import generate_demo
from trainer.train import (
    CATALOG_FRESH,
    CatalogBank,
    cpu_bf16_pays,
    cpu_vendor,
    cutmix,
    epoch_size,
    freeze_stages,
    load_checkpoint,
    native_bf16,
    pick_precision,
    train,
    update_ema,
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "data"
    generate_demo(root, products=5, train=6, val=2, scans=0, size=96, seed=3)
    return root


def test_catalog_photos_are_found_as_references(tiny: Path) -> None:
    labels, _, _ = read_layout(tiny)
    refs = read_references(tiny, labels)
    assert len(refs) == len(labels.fine)  # one catalog.jpg per product
    assert sorted(refs.fine) == list(range(len(labels.fine)))
    assert all(p.name == "catalog.jpg" for p in refs.paths)


def test_grocery_iconic_photos_are_references(tmp_path: Path) -> None:
    (tmp_path / "iconic" / "A").mkdir(parents=True)
    (tmp_path / "iconic" / "A" / "a.jpg").write_bytes(b"x")
    (tmp_path / "classes.csv").write_text(
        "Class Name (str),Class ID (int),Coarse Class Name (str),Coarse Class ID (int),"
        "Iconic Image Path (str),Product Description Path (str)\n"
        "A,0,Fruit,0,/iconic/A/a.jpg,/iconic/A/d.txt\n"
        "B,1,Fruit,0,/iconic/B/missing.jpg,/iconic/B/d.txt\n")
    (tmp_path / "train.txt").write_text("")
    (tmp_path / "val.txt").write_text("")
    labels, _, _ = read_layout(tmp_path)
    refs = read_references(tmp_path, labels)
    assert refs.paths == [tmp_path / "iconic" / "A" / "a.jpg"]  # a missing file is no reference
    assert refs.fine == [0]


def test_holdout_removes_products_everywhere_and_renumbers(tiny: Path) -> None:
    labels, train_split, val = read_layout(tiny)
    gone = labels.fine[1]
    kept, (tr, va) = drop_products(labels, [train_split, val], [gone])
    assert gone not in kept.fine and len(kept.fine) == len(labels.fine) - 1
    assert kept.coarse == labels.coarse  # categories stay, even one left without products
    assert len(tr) == len(train_split) - 6 and max(tr.fine) == len(kept.fine) - 1
    for split in (tr, va):  # every remaining photo keeps its product name
        for path, f in zip(split.paths, split.fine, strict=True):
            assert path.parent.name == kept.fine[f]
    with pytest.raises(DataError, match="unknown products: nope"):
        drop_products(labels, [train_split], ["nope"])


def test_cutmix_pastes_one_box_and_reports_the_share_kept() -> None:
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 20, 20).contiguous()
    mixed, partner, lam = cutmix(x, np.random.default_rng(0))
    for i in range(4):
        own = (mixed[i] == i).float().mean().item()
        assert own == pytest.approx(lam if partner[i] != i else 1.0, abs=1e-6)
    assert torch.equal(x[:, 0, 0, 0], torch.arange(4, dtype=torch.float32))  # input untouched


def test_random_erasing_covers_one_box_and_leaves_the_photo_alone() -> None:
    photo = np.full((100, 80, 3), 7, np.uint8)
    for seed in range(20):
        erased = random_erasing(photo, np.random.default_rng(seed))
        changed = np.argwhere((erased != 7).any(axis=2))
        (top, left), (bottom, right) = changed.min(0), changed.max(0) + 1
        box = (bottom - top) * (right - left)
        assert 0.02 * 8000 * 0.9 <= box <= 0.25 * 8000 * 1.1  # 2-25% of the photo
        assert len(changed) >= 0.95 * box  # one solid box of noise, not scattered pixels
    assert (photo == 7).all()  # the caller's photo is not touched


def test_camera_shift_changes_white_balance_and_focus_not_the_photo() -> None:
    photo = np.full((64, 64, 3), 128, np.uint8)
    photo[:, ::2] = 160  # fine stripes: focus shows in them
    gains, sharpness = [], []
    for seed in range(40):
        shot = camera_shift(photo, np.random.default_rng(seed))
        assert shot.shape == photo.shape and shot.dtype == np.uint8
        gains.append(shot.reshape(-1, 3).mean(0) / photo.reshape(-1, 3).mean(0))
        sharpness.append(np.abs(np.diff(shot[..., 1].astype(int), axis=1)).mean())
    gains = np.array(gains)
    assert np.allclose(gains[:, 1], 1.0, atol=0.01)  # green is the white-balance anchor
    assert gains[:, [0, 2]].min() < 0.92 and gains[:, [0, 2]].max() > 1.08  # red, blue move
    assert np.abs(gains[:, 0] - gains[:, 2]).max() > 0.05  # independently: a colour cast
    assert min(sharpness) < 0.5 * 32 and max(sharpness) == 32  # some out of focus, some not
    assert (photo[:, 1::2] == 128).all() and (photo[:, ::2] == 160).all()  # caller's untouched


def test_crop_scale_sets_how_much_of_the_photo_a_view_keeps() -> None:
    # each pixel holds its own position, so a view shows which part of the photo it kept
    ys, xs = np.mgrid[0:120, 0:160]
    photo = np.dstack([ys * 2, xs * 255 // 159, np.zeros_like(xs)]).astype(np.uint8)

    def kept(scale: float, seed: int) -> float:
        view = random_resized_crop(photo, 32, np.random.default_rng(seed), (scale, 1.0))
        rows = (view[..., 0].max() - view[..., 0].min()) / 2 + 1
        cols = (view[..., 1].max() - view[..., 1].min()) / (255 / 159) + 1
        return rows * cols / photo[..., 0].size

    wide = [kept(0.6, seed) for seed in range(30)]
    close = [kept(0.08, seed) for seed in range(30)]
    assert min(wide) >= 0.6 * 0.95  # never less than asked (a pixel of rounding)
    assert min(close) < 0.3 < max(close)  # close shots of a part, and whole views too


def test_ema_moves_towards_the_model() -> None:
    ema, model = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(2.0)
        model.num_batches_tracked.fill_(7)
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 1.25))  # 0.75 * 1 + 0.25 * 2
    assert ema.num_batches_tracked.item() == 7  # counters are copied, not averaged


def catalog_bank(products_with_photo: list[int], num_fine: int) -> CatalogBank:
    rng = np.random.default_rng(0)
    refs = Split([Path(f"{f}.jpg") for f in products_with_photo], products_with_photo,
                 [0] * len(products_with_photo),
                 [rng.integers(0, 256, (80, 90, 3), dtype=np.uint8) for _ in products_with_photo])
    return CatalogBank(refs, num_fine, torch.device("cpu"))


def test_catalog_loss_is_low_only_near_the_own_products_catalog_photo() -> None:
    bank = catalog_bank([0, 1, 2], 3)
    bank.vectors = torch.eye(3)
    view = torch.tensor([[1.0, 0.0, 0.0]])
    none, no_fresh = np.array([], int), torch.empty(0, 3)
    right = bank.loss(view, [0], none, no_fresh, scale=16.0, margin=0.2)
    wrong = bank.loss(view, [1], none, no_fresh, scale=16.0, margin=0.2)
    assert right.item() < 0.1 < 10 < wrong.item()


def test_catalog_loss_trains_the_fresh_catalog_embeddings_and_keeps_them() -> None:
    bank = catalog_bank([0, 2], 4)  # products 1 and 3 have no catalog photo
    bank.vectors = torch.eye(3)[:2].clone()
    fresh = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)  # product 2's, re-embedded
    views = torch.tensor([[0.0, 0.6, 0.8], [1.0, 0.0, 0.0]])
    loss = bank.loss(views, [2, 3], np.array([1]), fresh, scale=16.0, margin=0.2)
    loss.backward()
    assert fresh.grad is not None and fresh.grad.abs().sum() > 0  # pulled towards the view
    assert torch.equal(bank.vectors[1], fresh.detach()[0])  # the bank keeps the fresh one
    # a view of a product without a catalog photo takes no part
    alone = bank.loss(views[:1], [2], np.array([1]), fresh.detach(), scale=16.0, margin=0.2)
    assert torch.isclose(loss, alone)


def test_catalog_photos_re_embedded_are_of_the_batchs_products_and_few() -> None:
    bank = catalog_bank(list(range(0, 40, 2)), 40)  # even products have a catalog photo
    rows = bank.pick(list(range(40)) * 2, np.random.default_rng(0))
    assert len(rows) == CATALOG_FRESH and len(set(rows)) == len(rows)
    assert bank.pick([1, 3, 5], np.random.default_rng(0)).size == 0
    assert list(bank.pick([4, 5, 4], np.random.default_rng(0))) == [2]


def test_training_with_every_switch_on(tiny: Path, tmp_path: Path) -> None:
    labels, _, _ = read_layout(tiny)
    cfg = TrainConfig(data=str(tiny), out=str(tmp_path / "run"), size=64, epochs=2,
                      batch_size=8, margin=0.2, label_smoothing=0.1, cutmix=0.5, ema=0.9,
                      probe_epochs=1, reference_views=2, catalog_loss=1.0,
                      holdout=labels.fine[0], start_size=32, crop_scale=0.5)
    best = train(cfg)
    model, ckpt = load_checkpoint(best)
    assert ckpt["labels"]["fine"] == labels.fine[1:]
    assert model.prototypes().shape[0] == len(labels.fine) - 1
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    # the EMA copy is what was evaluated and saved, not the raw weights
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)
    assert not all(torch.equal(last["model"][k], last["train_model"][k]) for k in last["model"])


def test_progressive_resizing_grows_to_the_full_side_by_the_last_epoch() -> None:
    def sizes(**kw) -> list[int]:
        cfg = TrainConfig(data="-", **kw)
        return [epoch_size(cfg, e) for e in range(cfg.epochs)]

    assert sizes(size=160, start_size=112, epochs=4) == [112, 128, 144, 160]
    assert sizes(size=260, start_size=192, epochs=6) == [192, 208, 224, 240, 240, 260]
    assert sizes(size=160, epochs=3) == [160, 160, 160]  # off: every epoch at --size
    assert sizes(size=160, start_size=112, epochs=1) == [160]


def test_a_start_size_above_the_size_is_refused_in_one_line(tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), size=64, start_size=96)
    with pytest.raises(DataError, match="--start-size 96: use 32 px up to --size 64"):
        train(cfg)


@pytest.mark.parametrize("share", [0.0, 1.5])
def test_a_crop_scale_outside_the_photo_is_refused_in_one_line(tmp_path: Path,
                                                               share: float) -> None:
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), crop_scale=share)
    with pytest.raises(DataError, match=f"--crop-scale {share}: a share of the photo's area"):
        train(cfg)


def test_probe_epochs_leave_the_backbone_untouched(tiny: Path, tmp_path: Path) -> None:
    from models.recognizer import build_backbone

    cfg = TrainConfig(data=str(tiny), out=str(tmp_path / "run"), size=64, epochs=1,
                      batch_size=8, probe_epochs=1)
    train(cfg)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_model"]
    imagenet = build_backbone("efficientnet_lite0").state_dict()
    assert all(torch.equal(last[f"backbone.{k}"], v) for k, v in imagenet.items())


def test_resume_with_other_options_is_refused(tiny: Path, tmp_path: Path) -> None:
    cfg = TrainConfig(data=str(tiny), out=str(tmp_path / "run"), size=64, epochs=1, batch_size=8)
    train(cfg)
    with pytest.raises(DataError, match="trained with other size"):
        train(TrainConfig(data=str(tiny), out=str(tmp_path / "run"), size=80, epochs=2,
                          batch_size=8, resume=True))


def test_frozen_stages_keep_imagenet_weights_and_statistics(tiny: Path, tmp_path: Path) -> None:
    from models.recognizer import build_backbone

    cfg = TrainConfig(data=str(tiny), out=str(tmp_path / "run"), size=64, epochs=1,
                      batch_size=8, frozen_stages=2)
    train(cfg)
    last = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["train_model"]
    imagenet = build_backbone("efficientnet_lite0")
    stages = imagenet.stages()
    names = {id(m): n for n, m in imagenet.named_modules()}

    def state(stage: list[torch.nn.Module]) -> dict[str, torch.Tensor]:
        return {f"backbone.{names[id(m)]}.{k}": v for m in stage
                for k, v in m.state_dict().items()}

    frozen = {k: v for stage in stages[:2] for k, v in state(stage).items()}
    assert any("running_mean" in k for k in frozen)  # BatchNorm statistics are checked too
    assert all(torch.equal(last[k], v) for k, v in frozen.items())
    trained = state(stages[2])
    assert not all(torch.equal(last[k], v) for k, v in trained.items())


def test_freezing_more_stages_than_the_backbone_has_is_refused() -> None:
    from models.recognizer import build_recognizer

    model = build_recognizer("resnet18", 3, 2, weights="none")
    with pytest.raises(DataError, match="--frozen-stages 5: the backbone has 5 stages"):
        freeze_stages(model, 5)
    assert len(freeze_stages(model, 2)) == 3  # conv1, bn1, layer1
    assert not model.backbone.layer1[0].conv1.weight.requires_grad
    assert model.backbone.layer2[0].conv1.weight.requires_grad


def test_precision_bf16_only_where_native_and_on_a_cpu_only_where_it_pays() -> None:
    cpu = torch.device("cpu")
    assert pick_precision("fp32", cpu, 260) is None
    native = native_bf16(cpu)
    pays = native and (platform.machine() != "x86_64" or cpu_bf16_pays(
        torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported(), cpu_vendor()))
    assert pick_precision("auto", cpu, CPU_BF16_FROM_PX) == (torch.bfloat16 if pays else None)
    # small inputs train faster in FP32 even with native bf16 (0.67-0.72x at 112 px, AMD EPYC)
    assert pick_precision("auto", cpu, CPU_BF16_FROM_PX - 1) is None
    if native:  # asked for, it is used whatever the size
        assert pick_precision("bf16", cpu, 112) == torch.bfloat16
    else:
        with pytest.raises(DataError, match="no native bf16"):
            pick_precision("bf16", cpu, 260)


@pytest.mark.skipif(platform.machine() != "x86_64" or not Path("/proc/cpuinfo").exists(),
                    reason="reads the x86 CPU flags of Linux's /proc/cpuinfo")
def test_auto_precision_skips_bf16_that_avx512_only_emulates() -> None:
    # an AVX-512 CPU without AVX512-BF16 or AMX runs bf16 convolutions by converting to FP32
    # (1.8x slower Lite2 steps): auto must train it in FP32
    from bench.report import cpu_flags, read_cpuinfo

    flags = cpu_flags(read_cpuinfo())
    pays = "amx_bf16" in flags or ("avx512_bf16" in flags and cpu_vendor() == "AuthenticAMD")
    assert pick_precision("auto", torch.device("cpu"), 260) == (torch.bfloat16 if pays else None)


def test_auto_precision_takes_bf16_only_on_cpus_where_it_was_measured_to_pay() -> None:
    """AMX and an AMD EPYC's AVX512-BF16 train a Lite2 step faster in bf16; an Intel Xeon with
    AVX512-BF16 but no AMX took 1.6x as long as in FP32, so auto trains it in FP32."""
    assert cpu_bf16_pays(amx=True, avx512_bf16=True, vendor="GenuineIntel")
    assert cpu_bf16_pays(amx=False, avx512_bf16=True, vendor="AuthenticAMD")
    assert not cpu_bf16_pays(amx=False, avx512_bf16=True, vendor="GenuineIntel")
    assert not cpu_bf16_pays(amx=False, avx512_bf16=False, vendor="AuthenticAMD")
    if Path("/proc/cpuinfo").exists():
        assert cpu_vendor() in ("GenuineIntel", "AuthenticAMD") or platform.machine() != "x86_64"


def test_cli_arch_choices_are_the_buildable_architectures() -> None:
    from models.recognizer import ARCHITECTURES
    from trainer.config import ARCHS

    assert set(ARCHS) == set(ARCHITECTURES)


def test_fp32_training_of_the_whole_backbone(tiny: Path, tmp_path: Path) -> None:
    best = train(TrainConfig(data=str(tiny), out=str(tmp_path / "run"), size=64, epochs=1,
                             batch_size=8, precision="fp32", frozen_stages=0))
    assert best.is_file()


@pytest.mark.slow
def test_train_speed_bench_prints_every_variant() -> None:
    import subprocess
    import sys

    from tests.conftest import ROOT

    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_speed.py"), "--arch", "efficientnet_lite0",
         "--size", "64", "--batch-size", "4", "--rounds", "1", "--no-docs"],
        capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    for variant in ("FP32, contiguous (before)", "channels-last + 3 stages frozen (shipped)",
                    "channels-last + bf16 + 3 stages frozen"):  # auto: FP32 at 64 px
        assert variant in result.stdout


def test_loader_threads_do_not_change_the_trained_model(tiny: Path, tmp_path: Path) -> None:
    """Views are made on threads, a batch ahead; each draws from its own seed, so one thread
    and three give the same run (a GPU box and a laptop train the same model)."""
    weights = []
    for threads in (1, 3):
        train(TrainConfig(data=str(tiny), out=str(tmp_path / f"t{threads}"), size=64,
                          epochs=1, batch_size=8, loader_threads=threads, threads=1,
                          precision="fp32"))
        weights.append(torch.load(tmp_path / f"t{threads}" / "last.pt",
                                  weights_only=True)["train_model"])
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_negative_loader_threads_are_refused_in_one_line(tiny: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--loader-threads -1: use 0"):
        train(TrainConfig(data=str(tiny), out=str(tmp_path / "run"), loader_threads=-1))
