"""The workstation's subcommands: demo-data, train, evaluate, export, compare.

Importing this module needs no torch; each command imports what it needs when it runs, so a
kiosk without the `train` extra still lists them and says what to install.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

from models.weights import WeightsError
from trainer.config import (
    ARCHS,
    CPU_BF16_FROM_PX,
    FEATURE_WEIGHT,
    FP32_CONVS,
    FP32_SENSITIVE,
    MIN_AGREEMENT,
    PRECISIONS,
    TrainConfig,
)
from trainer.errors import DataError, ExportError, TrainExtraMissing


def _need_torch() -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        raise TrainExtraMissing("this command needs the trainer's packages: "
                                "pip install 'storyscan[train]'") from None


def cmd_demo_data(args: argparse.Namespace) -> int:
    from pathlib import Path

    from trainer.synthetic import generate_demo, write_scan_video

    demo = generate_demo(args.out, products=args.products, train=args.train, val=args.val,
                         scans=args.scans, size=args.size, seed=args.seed, progress=True)
    print(f"demo catalog of {len(demo.products)} products written to {args.out}")
    if args.video_placements:
        video = Path(args.out) / "scan_video.avi"
        plan = write_scan_video(video, demo.products, args.video_placements, seed=args.seed)
        print(f"scan video of {len(plan)} placements written to {video} (the kiosk's "
              f"simulated camera: storyscan kiosk --camera {video})")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    _need_torch()
    from trainer.train import train

    names = {f.name for f in fields(TrainConfig)}
    train(TrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    _need_torch()
    from trainer.evaluate import evaluate

    evaluate(args.data, args.out, checkpoint=args.checkpoint, bundle=args.bundle,
             precision=args.precision)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    _need_torch()
    from trainer.export import ExportConfig, export

    names = {f.name for f in fields(ExportConfig)}
    export(ExportConfig(**{k: v for k, v in vars(args).items() if k in names}))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    _need_torch()
    from pathlib import Path

    from trainer.compare import CompareConfig, compare, markdown_table, table

    names = {f.name for f in fields(CompareConfig)}
    cfg = CompareConfig(**{k: v for k, v in vars(args).items() if k in names})
    results = compare(cfg)
    print(table(results))
    if args.markdown:
        Path(args.markdown).write_text(markdown_table(results) + "\n", encoding="utf-8")
    print(f"results written to {Path(cfg.out) / 'compare.json'}")
    return 0


def register(sub: argparse._SubParsersAction) -> list[type[Exception]]:
    p = sub.add_parser("demo-data", help="generate the synthetic demo catalog and photos")
    p.add_argument("out", help="output folder")
    p.add_argument("--products", type=int, default=30, help="products in the demo shop")
    p.add_argument("--train", type=int, default=24, help="training photos per product")
    p.add_argument("--val", type=int, default=6, help="validation photos per product")
    p.add_argument("--scans", type=int, default=6, help="held-out scan photos per product")
    p.add_argument("--size", type=int, default=256, help="photo side in pixels")
    p.add_argument("--seed", type=int, default=0, help="the same seed makes the same shop")
    p.add_argument("--video-placements", type=int, default=8, metavar="N",
                   help="products placed in the 1280x720 scan video scan_video.avi, the "
                        "kiosk's simulated camera (0: no video)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("train", help="fine-tune a recognition network on product photos")
    p.add_argument("--data", required=True,
                   help="folder tree (train/ and val/) or Grocery-Store-style list files")
    p.add_argument("--out", default="runs/model", help="checkpoint folder")
    p.add_argument("--arch", default=TrainConfig.arch, choices=ARCHS, metavar="ARCH",
                   help=f"the network: {', '.join(ARCHS)}")
    p.add_argument("--weights", default="imagenet",
                   help="imagenet, none (random init) or a backbone checkpoint file")
    p.add_argument("--size", type=int, default=TrainConfig.size, help="network input side")
    p.add_argument("--start-size", type=int, default=TrainConfig.start_size,
                   help="progressive resizing: the first epoch's input side, growing to --size "
                        "by the last epoch (0: every epoch at --size)")
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs,
                   help="passes over the training photos")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size,
                   help="training views a step")
    p.add_argument("--lr", type=float, default=TrainConfig.lr,
                   help="the backbone's peak learning rate (SGD, cosine schedule)")
    p.add_argument("--head-lr-mult", type=float, default=TrainConfig.head_lr_mult,
                   help="learning rate of the freshly initialised heads, times --lr")
    p.add_argument("--momentum", type=float, default=TrainConfig.momentum, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=TrainConfig.weight_decay,
                   help="L2 weight decay")
    p.add_argument("--warmup-epochs", type=float, default=TrainConfig.warmup_epochs,
                   help="linear learning-rate warm-up before the cosine schedule")
    p.add_argument("--embed-dim", type=int, default=TrainConfig.embed_dim,
                   help="length of the embedding the kiosk matches")
    p.add_argument("--margin", type=float, default=TrainConfig.margin,
                   help="CosFace cosine margin of the product head (metric learning)")
    p.add_argument("--scale", type=float, default=TrainConfig.scale,
                   help="cosine-softmax scale (inverse temperature) of the product head")
    p.add_argument("--label-smoothing", type=float, default=TrainConfig.label_smoothing,
                   help="share of each target spread over the other products")
    p.add_argument("--cutmix", type=float, default=TrainConfig.cutmix,
                   help="share of CutMix batches")
    p.add_argument("--erasing", type=float, default=TrainConfig.erasing,
                   help="chance of a random-erasing box on a training view")
    p.add_argument("--camera", type=float, default=TrainConfig.camera,
                   help="chance of another camera's white balance and focus on a training view")
    p.add_argument("--crop-scale", type=float, default=TrainConfig.crop_scale,
                   help="least share of a photo's area a training view's random crop keeps")
    p.add_argument("--ema", type=float, default=TrainConfig.ema,
                   help="decay of an exponential moving average of the weights (0 = off)")
    p.add_argument("--probe-epochs", type=int, default=TrainConfig.probe_epochs,
                   help="first epochs train the heads only, on a frozen backbone")
    p.add_argument("--frozen-stages", type=int, default=TrainConfig.frozen_stages,
                   help="leading backbone stages kept at their ImageNet weights (the stem is "
                        "stage 0; 0 trains everything)")
    p.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                   help="bf16 autocast or fp32 training; auto = bf16 where the hardware has it "
                        f"natively and it pays (on a CPU: AMX, or AVX512-BF16 on AMD, from "
                        f"{CPU_BF16_FROM_PX} px inputs up)")
    p.add_argument("--reference-views", type=int, default=TrainConfig.reference_views,
                   help="catalog reference photos join each epoch this many times")
    p.add_argument("--catalog-loss", type=float, default=TrainConfig.catalog_loss,
                   help="weight of classifying each view against the embeddings of the "
                        "products' catalog photos (the enrol-from-catalog-photo task; 0: off)")
    p.add_argument("--shop-views", type=float, default=TrainConfig.shop_views,
                   help="chance that a view of a studio catalog photo (product on white or light "
                        "grey) is first made a shop view: cut out, alone or piled, on a dark "
                        "backdrop")
    p.add_argument("--coarse-weight", type=float, default=TrainConfig.coarse_weight,
                   help="weight of the category head's loss next to the product head's")
    p.add_argument("--attribute-weight", type=float, default=TrainConfig.attribute_weight,
                   help="weight of the attribute head's loss when the catalog has attribute "
                        "labels (0: no attribute head)")
    p.add_argument("--holdout", default="",
                   help="comma-separated products left out of training entirely")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the heads, the views and their order")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = all cores)")
    p.add_argument("--loader-threads", type=int, default=0,
                   help="threads making augmented training views (0 = one per core, at most 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="top-1/top-5, macro-F1, per-class table, confusion PNG")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a checkpoint from 'storyscan train'")
    which.add_argument("--bundle", help="a bundle from 'storyscan export'")
    p.add_argument("--precision", choices=("int8", "fp32"), default="int8",
                   help="which model of the bundle")
    p.add_argument("--data", required=True, help="data folder; its val split is used")
    p.add_argument("--out", default="runs/eval", help="report folder")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="write a kiosk bundle: ONNX FP32 + calibrated INT8")
    p.add_argument("checkpoint", help="a checkpoint from 'storyscan train' (best.pt)")
    p.add_argument("--data", required=True,
                   help="the training data: calibration from train, INT8 check on val")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--name", default="storyscan", help="the bundle's model name")
    p.add_argument("--version", default="1", help="the bundle's model version")
    p.add_argument("--calibration-photos", type=int, default=256,
                   help="training photos that set the INT8 activation ranges")
    p.add_argument("--calibration", choices=("minmax", "percentile", "entropy"),
                   default="minmax", help="how those photos set the ranges")
    p.add_argument("--fp32-convs", type=int, default=FP32_CONVS,
                   help="keep the first N convolutions in FP32 (see docs/BENCHMARKS.md)")
    p.add_argument("--fp32-sensitive", type=int, default=FP32_SENSITIVE,
                   help="and the N later convolutions whose INT8 error moves the product "
                        "scores most, measured on calibration photos (one trial model each)")
    p.add_argument("--no-flip", dest="flip", action="store_false",
                   help="do not average each photo with its mirror image (half the inference)")
    p.add_argument("--feature-weight", type=float, default=FEATURE_WEIGHT,
                   help="share of the backbone's pooled features in the embedding the kiosk "
                        "matches (0: the trained embedding alone)")
    p.add_argument("--min-agreement", type=float, default=MIN_AGREEMENT,
                   help="refuse below this INT8-vs-FP32 top-1 agreement on val")
    p.add_argument("--force", action="store_true", help="write the bundle even below it")
    p.add_argument("--tensorrt", choices=("onnx", "torch2trt"), default="onnx",
                   help="onnx: the kiosk builds its TensorRT engine from the bundle's ONNX; "
                        "torch2trt: also convert here (CUDA GPU and torch2trt needed) and ship "
                        "the engine in the bundle")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="train, export and measure several architectures "
                       "on the same data: accuracy, size, MACs, train time, INT8 latency")
    p.add_argument("--archs", default="resnet18,resnet50,efficientnet_lite0",
                   type=lambda s: s.split(","),
                   help="comma-separated ARCH or ARCH:WEIGHTS (imagenet, none or a checkpoint)")
    p.add_argument("--data", required=True,
                   help="folder tree (train/ and val/) or Grocery-Store-style list files")
    p.add_argument("--weights", default="imagenet", help="weights of archs given without one")
    p.add_argument("--out", default="runs/compare",
                   help="folder for each arch's checkpoints and bundle, and compare.json")
    p.add_argument("--size", type=int, default=224, help="network input side")
    p.add_argument("--epochs", type=int, default=10, help="epochs each architecture trains")
    p.add_argument("--batch-size", type=int, default=32, help="training views a step")
    p.add_argument("--lr", type=float, default=0.01, help="the backbone's peak learning rate")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for training and the latency runs (0 = all cores)")
    p.add_argument("--seed", type=int, default=0, help="one seed for every architecture")
    p.add_argument("--markdown", help="also write the table as Markdown to this file")
    p.set_defaults(func=cmd_compare)

    return [DataError, ExportError, TrainExtraMissing, WeightsError]
