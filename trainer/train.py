"""Fine-tune a recognition network on product photos. Read it top to bottom.

ImageNet backbone, random-resized-crop / flip / colour-jitter augmentation, class-weighted
cross-entropy on the product (fine) and category (coarse) heads, SGD with momentum and a
cosine schedule after a short warm-up. A checkpoint is written each epoch (`last.pt`, for
`--resume`), and the one with the best validation product top-1 is kept as `best.pt`.

Speed, on the 2-core CPUs it must train on (bench/train_speed.py): the network runs
channels-last, in bf16 autocast where the hardware has native bf16 that pays on it and the
inputs are large enough (master weights and checkpoints stay FP32), and the backbone's first
`frozen_stages` stages keep their ImageNet weights and statistics, so autograd skips their
backward pass. Augmented views are made on a thread pool a batch ahead (one thread cannot feed
a GPU), each from its own seed.

The product head is a cosine classifier, so its loss is a metric-learning loss (normalised
softmax); `margin` turns it into CosFace, pulling each product's photos tighter around its
prototype, which is what nearest-reference matching and the "unknown" threshold rely on. The
defaults are the recipe bench/recipe.py and bench/seeds.py found to pay on the Grocery Store
data (the margin, the catalog photos as extra views, random erasing, and the catalog-photo loss:
each view also classified against the embeddings of the products' catalog photos, so that a
product the model never saw is found from its catalog photo alone); label smoothing, CutMix,
weight EMA, a frozen-backbone probe phase and progressive resizing (`start_size`) are there,
off, with their numbers in docs/BENCHMARKS.md.

When the catalog labels products with attributes (see trainer/ingest.py), the model gets a
multi-label attribute head trained with `attribute_weight` x binary cross-entropy against its
photo's product's attributes; the validation report then adds attribute micro-F1 (a logit above
0, i.e. probability above 0.5, counts as present). Without attribute labels nothing changes.
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.preprocess import InputSpec, prepare, resize_shorter
from models.recognizer import Recognizer, build_recognizer, input_spec
from trainer.augment import augment
from trainer.config import CPU_BF16_FROM_PX, TrainConfig
from trainer.errors import DataError
from trainer.ingest import DataSet, Labels, Split, describe, ingest
from trainer.metrics import Report, evaluate_scores, micro_f1, multi_hot

# --- data --------------------------------------------------------------------------------------


def holdout_products(holdout: str) -> list[str]:
    """The product names of a `--holdout` list."""
    return [n.strip() for n in holdout.split(",") if n.strip()]


def load_data(cfg: TrainConfig, spec: InputSpec) -> DataSet:
    """Train photos kept a little larger than the crop (augmentation zooms); val ones prepared.
    Attribute labels are dropped when `attribute_weight` is 0: no head is trained for them."""
    keep = round(spec.resize * 1.25)
    data = ingest(cfg.data,
                  train_transform=lambda img: resize_shorter(img, keep)
                  if min(img.shape[:2]) > keep else img,
                  val_transform=lambda img: prepare(img, spec),
                  holdout=holdout_products(cfg.holdout))
    if not cfg.attribute_weight:
        data.labels = replace(data.labels, attributes=[], attributes_of_fine=[])
    return data


def training_pool(data: DataSet, reference_views: int) -> Split:
    """The photos an epoch draws from: train photos plus the catalog's reference photos."""
    refs = data.references.subset(list(range(len(data.references))) * reference_views)
    return Split(data.train.paths + refs.paths, data.train.fine + refs.fine,
                 data.train.coarse + refs.coarse, data.train.images + refs.images)


def class_weights(labels: list[int], n: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over present classes), so rare products count fully."""
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def batches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + size] for i in range(0, n - size + 1, size)] or [order]


def cutmix(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray, float]:
    """Paste a random box of a shuffled batch into `x`: (mixed, partner order, own share)."""
    n, _, h, w = x.shape
    perm = rng.permutation(n)
    lam = rng.uniform()
    bh, bw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
    top, left = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    x = x.clone()
    x[:, :, top : top + bh, left : left + bw] = x[perm, :, top : top + bh, left : left + bw]
    return x, perm, 1 - bh * bw / (h * w)


def with_margin(logits: torch.Tensor, target: torch.Tensor, scale: float, margin: float
                ) -> torch.Tensor:
    """CosFace: cosine logits (times `scale`) with the true class's lowered by `margin`, so
    it must win by that margin in cosine."""
    return logits - scale * margin * F.one_hot(target, logits.shape[1]) if margin else logits


# catalog photos re-embedded with gradients each step by the catalog-photo loss
CATALOG_FRESH = 8


class CatalogBank:
    """Each trained product's catalog photo and its latest embedding, for the catalog-photo
    loss: a training view must be nearer its own product's catalog photo than any other's, as a
    product enrolled from its catalog photo alone must be on the kiosk. Embedding every catalog
    photo each step would cost more than the step, so each step re-embeds, with gradients,
    those of up to CATALOG_FRESH products in its batch; the rest are as last embedded (a
    memory bank, refreshed whole each epoch)."""

    def __init__(self, refs: Split, num_fine: int, device: torch.device) -> None:
        first: dict[int, int] = {}
        for j, fine in enumerate(refs.fine):
            first.setdefault(fine, j)
        products = sorted(first)
        self.row = np.full(num_fine, -1)  # product -> its row in the bank (-1: no photo)
        self.row[products] = np.arange(len(products))
        self.photos = [refs.images[first[f]] for f in products]
        self.spec: InputSpec | None = None
        self.inputs: list[np.ndarray] = []
        self.device = device
        self.vectors = torch.empty(0)

    @torch.no_grad()
    def refresh(self, model: Recognizer, spec: InputSpec) -> None:
        """Embed every catalog photo anew, prepared as the kiosk would at this epoch's side."""
        if spec != self.spec:
            self.spec, self.inputs = spec, [prepare(img, spec) for img in self.photos]
        self.vectors = torch.from_numpy(predict(model, self.inputs)["embedding"]).to(self.device)

    def pick(self, fine: list[int], rng: np.random.Generator) -> np.ndarray:
        """Bank rows to re-embed this step: of products in the batch, in random order."""
        rows = np.unique(self.row[fine])
        return rng.permutation(rows[rows >= 0])[:CATALOG_FRESH]

    def batch(self, rows: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.stack([self.inputs[r] for r in rows]))

    def loss(self, queries: torch.Tensor, fine: list[int], rows: np.ndarray,
             fresh: torch.Tensor, scale: float, margin: float) -> torch.Tensor:
        """CosFace cross-entropy of `queries` (unit embeddings of products `fine`) against
        the bank, with rows `rows` replaced by `fresh` (which the bank then keeps)."""
        index = torch.from_numpy(rows).to(self.device)
        refs = self.vectors.index_copy(0, index, fresh)
        self.vectors[index] = fresh.detach()
        target = torch.from_numpy(self.row[fine]).to(self.device)
        keep = target >= 0
        logits = with_margin(scale * queries[keep] @ refs.t(), target[keep], scale, margin)
        return F.cross_entropy(logits, target[keep])


@torch.no_grad()
def update_ema(ema: Recognizer, model: Recognizer, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, over weights and BatchNorm statistics."""
    for e, m in zip(ema.state_dict().values(), model.state_dict().values(), strict=True):
        if e.dtype.is_floating_point:
            e.mul_(decay).add_(m, alpha=1 - decay)
        else:
            e.copy_(m)


# --- evaluation --------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                        else "cpu" if name == "auto" else name)


def on_x86() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 in hardware. On x86 that takes AVX512-BF16 or AMX: oneDNN
    also runs bf16 on plain AVX-512 (what `torch.ops.mkldnn._is_mkldnn_bf16_supported` reports),
    by converting to FP32, and there a shipped Lite2 training step took 2.4x as long as FP32's
    (bench/train_speed.py, train-speed-intel-fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if on_x86():
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.ops.mkldnn._is_mkldnn_bf16_supported()  # Arm: true only with BF16 instructions


def cpu_vendor() -> str:
    """The CPU's vendor_id in Linux's /proc/cpuinfo (GenuineIntel, AuthenticAMD; '' elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    line = next((ln for ln in text.splitlines() if ln.startswith("vendor_id")), "")
    return line.partition(":")[2].strip()


def cpu_bf16_pays(amx: bool, avx512_bf16: bool, vendor: str) -> bool:
    """Whether native bf16 trains faster than FP32 on an x86 CPU, as measured on a shipped
    training step (bench/train_speed.py): AMX, yes; AVX512-BF16 on an AMD EPYC, yes (Lite2
    260 px 1.07-1.26x, Lite0 224 px 1.02-1.14x; train-speed-amd-bf16); AVX512-BF16 on an
    Intel Xeon without AMX, no (Lite2 260 px 0.62x: train-speed-s40-intel-avx512bf16)."""
    return amx or (avx512_bf16 and vendor == "AuthenticAMD")


def pick_precision(name: str, device: torch.device, size: int) -> torch.dtype | None:
    """The autocast dtype (None: plain FP32) for inputs of side `size`. "auto" takes bf16 only
    where it is native and, on a CPU, only where it was measured to pay (`cpu_bf16_pays`) and
    from CPU_BF16_FROM_PX up: emulated bf16 on an older CPU, and native bf16 on small inputs or
    on an Intel CPU without AMX, are slower than FP32."""
    if name == "fp32":
        return None
    if not native_bf16(device):
        if name == "bf16":
            raise DataError(f"--precision bf16: {device} has no native bf16; use fp32")
        return None
    if name == "bf16" or device.type != "cpu":
        return torch.bfloat16
    pays = size >= CPU_BF16_FROM_PX and (not on_x86() or cpu_bf16_pays(
        torch.cpu._is_amx_tile_supported(), torch.cpu._is_avx512_bf16_supported(), cpu_vendor()))
    return torch.bfloat16 if pays else None


def freeze_stages(model: Recognizer, count: int) -> list[torch.nn.Module]:
    """Stop training the backbone's first `count` stages: no gradients (autograd then skips
    their backward pass entirely) and no BatchNorm statistics updates. Returns the frozen
    modules, which must be put back in eval mode whenever the model is set to train."""
    stages = model.backbone.stages()
    if count >= len(stages):
        raise DataError(f"--frozen-stages {count}: the backbone has {len(stages)} stages")
    frozen = [m for stage in stages[:count] for m in stage]
    for m in frozen:
        m.requires_grad_(False)
    return frozen


@torch.no_grad()
def predict(model: Recognizer, inputs: list[np.ndarray], batch_size: int = 64
            ) -> dict[str, np.ndarray]:
    """Run prepared inputs through the model in eval mode: {embedding, fine, coarse} arrays,
    and `attributes` logits when the model has that head."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {name: [] for name in model.output_names}
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.stack(inputs[i : i + batch_size])).to(device).contiguous(
            memory_format=torch.channels_last)
        for name, y in zip(out, model(x), strict=True):
            out[name].append(y.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_split(model: Recognizer, split: Split) -> tuple[Report, dict[str, np.ndarray]]:
    out = predict(model, split.images)
    report = evaluate_scores(out["fine"], np.array(split.fine), out["coarse"],
                             np.array(split.coarse))
    return report, out


def attribute_f1(logits: np.ndarray, fine: list[int], labels: Labels) -> float:
    """Micro-F1 of the attributes a logit above 0 (probability 0.5) calls present, against
    those of each photo's product."""
    targets = multi_hot(labels.attributes_of_fine, len(labels.attributes))[fine]
    return micro_f1(logits > 0, targets)


# --- checkpoints -------------------------------------------------------------------------------


def save_checkpoint(path: Path, state: dict) -> None:
    """Write-then-rename, so a crash mid-save never leaves a half checkpoint."""
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | Path) -> tuple[Recognizer, dict]:
    """A trained Recognizer and its checkpoint dict (loaded with weights_only=True)."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    labels = ckpt["labels"]
    model = build_recognizer(ckpt["config"]["arch"], len(labels["fine"]), len(labels["coarse"]),
                             weights="none", embed_dim=ckpt["config"]["embed_dim"],
                             scale=ckpt["config"]["scale"],
                             num_attributes=len(labels.get("attributes", [])))
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


def epoch_size(cfg: TrainConfig, epoch: int) -> int:
    """The input side of 0-based `epoch`: `size`, or with `start_size` (progressive resizing)
    a side growing linearly from start_size, in steps of 16, to `size` in the last epoch."""
    if not cfg.start_size or epoch >= cfg.epochs - 1:
        return cfg.size
    grown = cfg.start_size + (cfg.size - cfg.start_size) * epoch / (cfg.epochs - 1)
    return min(cfg.size, max(cfg.start_size, 16 * round(grown / 16)))


# --- the loop ----------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Train as configured; returns the path of the best checkpoint."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    if cfg.loader_threads < 0:
        raise DataError(f"--loader-threads {cfg.loader_threads}: use 0 (one per core) or more")
    if cfg.start_size and not 32 <= cfg.start_size <= cfg.size:
        raise DataError(f"--start-size {cfg.start_size}: use 32 px up to --size {cfg.size}, "
                        "or 0 to train every epoch at --size")
    if not 0 < cfg.crop_scale <= 1:
        raise DataError(f"--crop-scale {cfg.crop_scale}: a share of the photo's area, above 0 "
                        "and at most 1")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = input_spec(cfg.arch, cfg.size)

    data = load_data(cfg, spec)
    print(describe(data))
    labels: Labels = data.labels
    device = pick_device(cfg.device)
    # channels-last: the layout oneDNN and cuDNN run convolutions fastest in (2x on CPU)
    model = build_recognizer(cfg.arch, len(labels.fine), len(labels.coarse), cfg.weights,
                             cfg.embed_dim, cfg.scale, len(labels.attributes)
                             ).to(device, memory_format=torch.channels_last)
    # random weights have nothing worth keeping: a network trained from scratch trains whole
    frozen = freeze_stages(model, cfg.frozen_stages if cfg.weights != "none" else 0)
    sizes = [epoch_size(cfg, e) for e in range(cfg.epochs)]
    autocasts = [pick_precision(cfg.precision, device, size) for size in sizes]
    print(f"training {cfg.arch} at {' -> '.join(map(str, dict.fromkeys(sizes)))} px on {device} "
          "in " + " then ".join(dict.fromkeys("bf16 autocast" if a else "fp32" for a in autocasts))
          + (f", first {cfg.frozen_stages} backbone stages frozen" if frozen else ""))
    heads = {id(p) for p in model.head_parameters()}
    optimizer = torch.optim.SGD(
        [{"params": [p for p in model.parameters() if id(p) not in heads and p.requires_grad],
          "lr_mult": 1.0},
         {"params": model.head_parameters(), "lr_mult": cfg.head_lr_mult}],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    pool = training_pool(data, cfg.reference_views)
    fine_w = class_weights(pool.fine, len(labels.fine)).to(device)
    coarse_w = class_weights(pool.coarse, len(labels.coarse)).to(device)
    ema = copy.deepcopy(model).eval() if cfg.ema else None
    # [product, attribute] 0/1: a photo's attribute targets are its product's row
    attribute_targets = torch.from_numpy(
        multi_hot(labels.attributes_of_fine, len(labels.attributes))).float().to(device)

    def losses(idx: np.ndarray, fine: torch.Tensor, coarse: torch.Tensor,
               attributes: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of the heads' outputs for the photos `idx` of the pool."""
        y_fine = torch.tensor([pool.fine[j] for j in idx], device=device)
        y_coarse = torch.tensor([pool.coarse[j] for j in idx], device=device)
        fine = with_margin(fine, y_fine, cfg.scale, cfg.margin)
        loss = (F.cross_entropy(fine, y_fine, weight=fine_w, label_smoothing=cfg.label_smoothing)
                + cfg.coarse_weight * F.cross_entropy(coarse, y_coarse, weight=coarse_w,
                                                      label_smoothing=cfg.label_smoothing))
        if attributes is not None:  # summed over attributes: a larger vocabulary is no weaker
            loss = loss + cfg.attribute_weight * F.binary_cross_entropy_with_logits(
                attributes, attribute_targets[y_fine], reduction="none").sum(1).mean()
        return loss

    steps_per_epoch = max(1, len(pool) // cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    start_epoch, best_top1, history = 0, -1.0, []
    if cfg.resume and (out / "last.pt").exists():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=True)
        keys = ("arch", "size", "embed_dim", "holdout", "data")
        was = {k: ckpt["config"].get(k) for k in keys} | {
            "attribute labels": ckpt["labels"].get("attributes", [])}  # they shape the model
        now = {k: getattr(cfg, k) for k in keys} | {"attribute labels": labels.attributes}
        changed = [k for k in was if was[k] != now[k]]
        if changed:
            raise DataError(f"{out / 'last.pt'} was trained with other "
                            + ", ".join(f"{k} ({was[k]!r})" for k in changed)
                            + ": resume with the same options or a new --out")
        model.load_state_dict(ckpt.get("train_model", ckpt["model"]))
        if ema is not None:
            ema.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        start_epoch, best_top1, history = ckpt["epoch"], ckpt["best_top1"], ckpt["history"]
        print(f"resumed from {out / 'last.pt'} after epoch {start_epoch}")

    # training views are made on `loader_threads` threads, a batch ahead of the step (OpenCV and
    # numpy release the GIL): one thread cannot keep a GPU busy. Each view draws from its own
    # seed, so a run gives the same views whatever the thread count.
    loader = ThreadPoolExecutor(cfg.loader_threads or min(8, os.cpu_count() or 1))

    def views(idx: np.ndarray, spec: InputSpec) -> list[Future]:
        seeds = rng.integers(0, 2**63, size=len(idx))
        return [loader.submit(augment, pool.images[j], spec, np.random.default_rng(s),
                              cfg.erasing, cfg.shop_views if j >= len(data.train) else 0.0,
                              cfg.camera, cfg.crop_scale)
                for j, s in zip(idx, seeds, strict=True)]

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    bank = (CatalogBank(data.references, len(labels.fine), device)
            if cfg.catalog_loss and len(data.references) else None)
    for epoch in range(start_epoch, cfg.epochs):
        probing = epoch < cfg.probe_epochs  # heads only: no backward through the backbone
        epoch_spec = input_spec(cfg.arch, sizes[epoch])
        autocast = autocasts[epoch]
        if bank is not None:
            bank.refresh(model, epoch_spec)
        model.train()
        for m in [model.backbone] if probing else frozen:
            m.eval()
        t0, seen, loss_sum = time.time(), 0, 0.0
        order = batches(len(pool), cfg.batch_size, rng)
        ahead = views(order[0], epoch_spec)
        bar = tqdm(order, desc=f"epoch {epoch + 1}/{cfg.epochs} ({epoch_spec.size} px, "
                   f"{'bf16' if autocast else 'fp32'})", unit="batch", leave=False, disable=None)
        for i, idx in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step) * group["lr_mult"]
            current, ahead = ahead, views(order[i + 1], epoch_spec) if i + 1 < len(order) else []
            x = torch.from_numpy(np.stack([f.result() for f in current])).to(device).contiguous(
                memory_format=torch.channels_last)
            mixed = cfg.cutmix and rng.random() < cfg.cutmix
            if mixed:
                x, partner, lam = cutmix(x, rng)
            fine = [pool.fine[j] for j in idx]
            rows = bank.pick(fine, rng) if bank is not None and not mixed else np.array([], int)
            if len(rows):  # the catalog photos ride in the same batch (and BatchNorm)
                x = torch.cat([x, bank.batch(rows).to(device).contiguous(
                    memory_format=torch.channels_last)])
            with torch.autocast(device.type, autocast or torch.float32, autocast is not None):
                with torch.set_grad_enabled(not probing):
                    features = model.backbone.forward_features(x)
                embedding, *outputs = model.heads(features)  # fine, coarse[, attributes]
            n = len(idx)
            outputs = [o[:n].float() for o in outputs]
            loss = losses(idx, *outputs)
            if mixed:
                loss = lam * loss + (1 - lam) * losses(idx[partner], *outputs)
            if len(rows):
                embedding = embedding.float()
                loss = loss + cfg.catalog_loss * bank.loss(embedding[:n], fine, rows,
                                                           embedding[n:], cfg.scale, cfg.margin)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if ema is not None:  # short runs: the average must not start from ImageNet weights
                update_ema(ema, model, min(cfg.ema, (1 + step) / (10 + step)))
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr_at(step):.4f}")

        best_model = ema if ema is not None else model
        report, scores = evaluate_split(best_model, data.val) if len(data.val) else (None, {})
        val = report.to_dict() if report else {}
        if "attributes" in scores:
            val["attribute_micro_f1"] = attribute_f1(scores["attributes"], data.val.fine, labels)
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
                        "seconds": time.time() - t0, **val})
        top1 = val.get("fine_top1", -loss_sum / max(seen, 1))
        print(f"epoch {epoch + 1}/{cfg.epochs}"
              + (f" ({epoch_spec.size} px)" if cfg.start_size else "")
              + f": loss {loss_sum / max(seen, 1):.3f}"
              + (f", val product top-1 {val['fine_top1']:.3f}, category top-1 "
                 f"{val['coarse_top1']:.3f}" if val else "")
              + (f", attribute micro-F1 {val['attribute_micro_f1']:.3f}"
                 if "attribute_micro_f1" in val else "")
              + f" ({time.time() - t0:.0f} s)")
        state = {
            "model": {k: v.cpu() for k, v in best_model.state_dict().items()},
            "config": asdict(cfg),
            "labels": {"fine": labels.fine, "coarse": labels.coarse,
                       "coarse_of_fine": labels.coarse_of_fine,
                       "attributes": labels.attributes,
                       "attributes_of_fine": labels.attributes_of_fine},
            "input": spec.to_dict(),
            "epoch": epoch + 1,
            "val": val,
            "best_top1": max(best_top1, top1),
            "history": history,
            "train_model": {k: v.cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        save_checkpoint(out / "last.pt", state)
        if top1 > best_top1:
            best_top1 = top1
            save_checkpoint(out / "best.pt", {k: v for k, v in state.items() if k not in
                                              ("train_model", "optimizer", "rng", "torch_rng")})
    loader.shutdown()
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    print(f"best val product top-1 {best_top1:.3f}: {out / 'best.pt'}")
    return out / "best.pt"
