"""What `storyscan train` can be told, apart from the loop, so the CLI can show the defaults
without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

# what `--arch` accepts; models.recognizer.ARCHITECTURES builds them (a test keeps the two equal)
ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101", "efficientnet_lite0",
         "efficientnet_lite1", "efficientnet_lite2")
PRECISIONS = ("auto", "bf16", "fp32")
# on a CPU, bf16 autocast pays from this input side up. bench/train_speed.py, a shipped training
# step (3 stages frozen) on an AMD EPYC with AVX512-BF16, two runs (train-speed-amd-bf16): bf16
# ran efficientnet_lite2 at 260 px at 1.07x and 1.26x FP32's speed and lite0 at 224 px at
# 1.14x and 1.02x, but lite0 at 192 px at 1.00x and 0.91x, at 160 px 0.79x and 0.74x and at
# 112 px 0.67x and 0.72x: small convolutions spend their time converting to and from bf16
CPU_BF16_FROM_PX = 224
# `storyscan export --feature-weight`: share of the backbone's pooled features in the embedding
# the kiosk matches (models/recognizer.py); 0 = the trained embedding alone
FEATURE_WEIGHT = 0.0
# `storyscan export --fp32-convs`: leading convolutions kept in FP32 in the INT8 model. The stem
# and the first block are where INT8 error enters; keeping them costs +0.04 of FP32 time. It
# lifted INT8/FP32 agreement 94.9% -> 97.0% on one efficientnet_lite2 260 px model and left
# another at 98.0% (bench/int8_fidelity.py)
FP32_CONVS = 3
# `storyscan export --fp32-sensitive`: and the N later convolutions whose INT8 error moves the
# product scores most, ranked on calibration photos (trainer/quantize.py rank_convs). On an
# efficientnet_lite2 260 px model, 10 lifted agreement on val 98.3% -> 99.7% (97.3% -> 99.3% on
# a second checkpoint) and cut the score divergence 5x, but INT8 took 1.3-2.0x as long a photo
# (18.4 vs 13.7 ms, and 39 vs 20 ms in a second run; FP32 25-50 ms) on 2 cores, and export 3
# minutes longer (4 before its trials ran in parallel; bench/int8_fidelity.py). Off by
# default, so INT8 keeps its speed; the Grocery recipe in the README turns it on
FP32_SENSITIVE = 0
# `storyscan export --min-agreement`: a guard against a broken INT8 model (per-tensor weights
# measured 76%), not the quality target; bundles of the shipped recipe measure 97-98%, and
# 99.3-99.7% with --fp32-sensitive 10 as the README's Grocery recipe exports them
MIN_AGREEMENT = 0.95


@dataclass
class TrainConfig:
    data: str  # folder tree or Grocery-Store list files, see trainer/ingest.py
    out: str = "runs/model"
    arch: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | path to a backbone checkpoint
    size: int = 224  # network input side
    # progressive resizing: the first epoch's input side, growing in steps of 16 to `size` by
    # the last epoch (0: every epoch at `size`); smaller early epochs buy more epochs for the
    # same minutes. Off: 4 epochs 112 -> 160 px against 3 at 160, in 0.91x the time, cost INT8
    # top-1 -1.7 +- 0.5 pp and new products from their catalog photo -8.0 +- 2.6 pp
    # (bench/seeds.py, seeds-progressive-s37, efficientnet_lite0, 2 seeds)
    start_size: int = 0
    # 128 and 512 against 256: new products from 5 photos -11.1 +- 3.5 and -14.2 +- 4.4 pp, the
    # rest within noise (bench/seeds.py, seeds-embed128-coarse025-s36 and seeds-coarse-embed-s36)
    embed_dim: int = 256
    # cosine-softmax scale (inverse temperature) of the product head. 32 cost INT8 top-1
    # -7.1 +- 1.4 pp and the kiosk matcher -6.1 pp; 12 and 8 cost new products from 5 photos
    # -8.0 and -6.2 pp for unknown AUROC +2.0 and +3.3 pp (bench/seeds.py, seeds-scale-erasing-s37
    # and seeds-scale-lower-s37, efficientnet_lite0 160 px, 2 seeds)
    scale: float = 16.0
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01  # backbone; the freshly initialised heads learn 10x faster
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    # 5e-4 cost INT8 top-1 -2.5 +- 3.1 pp and new products from 5 photos -9.3 +- 9.6 pp
    # (bench/seeds.py, seeds-camera-wd-s38, efficientnet_lite0 160 px, 2 seeds)
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    # share of the category loss next to the product loss; 1.0 cost INT8 top-1 -1.9 +- 0.7 pp
    # and the kiosk matcher -4.4 pp, 0.25 lifted nothing beyond noise (bench/seeds.py, 2 seeds)
    coarse_weight: float = 0.5
    attribute_weight: float = 0.5  # attribute-head loss, when the catalog has attributes (0: off)
    margin: float = 0.2  # CosFace additive cosine margin on the product head
    label_smoothing: float = 0.0
    # share of batches mixed with CutMix. Off: half the batches cost -4.9 +- 0.7 pp INT8 top-1,
    # -9.3 pp new products from their catalog photo, -3.1 pp unknown AUROC (bench/seeds.py,
    # seeds-cutmix-s36, efficientnet_lite0 160 px, 3 epochs, 2 seeds)
    cutmix: float = 0.0
    # chance that a training view gets a random-erasing box: a hand or a price tag over the
    # product (+4.0 pp val top-1, efficientnet_lite2 260 px, 12 epochs). 0.5 is a trade: coarse
    # INT8 top-1 +4.2 +- 1.7 pp, INT8/FP32 agreement +2.0 +- 0.5 pp, but the kiosk matcher
    # -2.5 +- 0.7 pp and new products -1.9 (5 photos) and -2.5 pp (catalog photo), so 0.25
    # stays (bench/seeds.py, seeds-scale-erasing-s37, efficientnet_lite0 160 px, 2 seeds)
    erasing: float = 0.25
    # chance that a training view is shifted to another camera's white balance and focus
    # (trainer/augment.py camera_shift): train and val photos come from different sessions.
    # Off: 0.5 cost new products from 5 photos -10.5 +- 6.1 pp (95% interval -20.8 to -0.6)
    # and from their catalog photo -8.0 pp, for trained products +0.8 pp (bench/seeds.py,
    # seeds-camera-wd-s38, efficientnet_lite0 160 px, 2 seeds)
    camera: float = 0.0
    # least share of a photo's area a training view's random crop keeps (the most is all of it):
    # low values show parts of a product, as a close shot or a pile does, high ones whole
    # products. 0.08 and 0.5 against 0.25: new products from 5 photos -6.5 +- 15.4 and
    # -2.2 +- 9.2 pp, from their catalog photo +1.4 and -5.1 pp, unknown AUROC -2.8 and -0.7 pp,
    # trained products within 0.5 pp: none beyond noise (bench/seeds.py, seeds-crop-s39,
    # efficientnet_lite0 160 px, 2 seeds, held-out fold 2)
    crop_scale: float = 0.25
    ema: float = 0.0  # decay of an exponential moving average of the weights (0 = off)
    probe_epochs: int = 0  # first epochs train the heads only, on a frozen backbone
    # leading backbone stages (the stem is stage 0) kept at their ImageNet weights and
    # statistics: generic edges and blobs need no retraining, and the high-resolution layers
    # cost most of a step's backward pass (ignored with weights "none")
    frozen_stages: int = 3
    # bf16 autocast (weights stay FP32); auto = bf16 where the CPU or GPU computes it natively,
    # on a CPU only where that was measured to pay (trainer/train.py cpu_bf16_pays) and from
    # CPU_BF16_FROM_PX up
    precision: str = "auto"
    # each catalog reference photo joins each epoch this many times. 8 cost unknown AUROC
    # -4.9 +- 3.2 pp (95% interval -9.6 to -0.4) and new products -4.3 (5 photos) and -3.7 pp
    # (catalog photo), for 10% more time (bench/seeds.py, seeds-refviews-s38, Lite0, 2 seeds)
    reference_views: int = 4
    # weight of the catalog-photo loss: each training view is also classified against the
    # current embeddings of the products' catalog photos instead of the learnt prototypes,
    # the task a product enrolled from its catalog photo alone sets the kiosk (0 = off).
    # New products from their catalog photo +12.8 +- 2.9 pp, unknown AUROC +2.0 pp, kiosk
    # matcher +3.2 pp, training +23 % (bench/seeds.py, 3 seeds, efficientnet_lite0 160 px).
    # 2 against 1: catalog photo +3.3 pp, but INT8 top-1 -4.7 +- 1.4 pp and the kiosk matcher
    # -4.4 pp (interval -8.9 to +0.0) (bench/seeds.py, seeds-catalog-loss-s39, 2 seeds, folds 1-2)
    catalog_loss: float = 1.0
    # chance that a training view of a studio catalog photo is first made a shop view: the
    # product cut out and placed, alone or piled, on a dark backdrop (models/studio.py).
    # Lite2 260 px held-out pair (seed 0), 0.5 against 0: new products from their catalog photo
    # +9.2 pp on tune (+5.0 on val), from 5 photos +6.1 pp, trained products +2.3 pp, unknown
    # AUROC +0.4 pp (bench/enrolment_views.py, bench/protocols.py); 0.25 on an earlier pair:
    # tune +8.1 pp, val -5.0 pp, trained products +0.0
    shop_views: float = 0.5
    holdout: str = ""  # comma-separated products left out entirely (enrolment experiments)
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = all cores
    loader_threads: int = 0  # threads making training views; 0 = one per core, at most 8
    device: str = "auto"  # auto = cuda when a GPU is there, else cpu
    resume: bool = False
