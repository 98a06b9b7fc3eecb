"""Fine-tune a recognition network on product photos. Read it top to bottom.

ImageNet backbone, random-resized-crop / flip / colour-jitter augmentation, class-weighted
cross-entropy on the product (fine) and category (coarse) heads, SGD with momentum and a
cosine schedule after a short warm-up. A checkpoint is written each epoch (`last.pt`, for
`--resume`), and the one with the best validation product top-1 is kept as `best.pt`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.preprocess import InputSpec, prepare, resize_shorter
from models.recognizer import Recognizer, build_recognizer, input_spec
from trainer.augment import augment
from trainer.ingest import DataSet, Labels, Split, describe, ingest
from trainer.metrics import Report, evaluate_scores


@dataclass
class TrainConfig:
    data: str  # folder tree or Grocery-Store list files, see trainer/ingest.py
    out: str = "runs/model"
    arch: str = "efficientnet_lite0"
    weights: str = "imagenet"  # imagenet | none | path to a backbone checkpoint
    size: int = 224  # network input side
    embed_dim: int = 256
    scale: float = 16.0  # cosine-softmax temperature of the product head
    epochs: int = 10
    batch_size: int = 32
    lr: float = 0.01  # backbone; the freshly initialised heads learn 10x faster
    head_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    coarse_weight: float = 0.5  # share of the category loss next to the product loss
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = all cores
    device: str = "auto"  # auto = cuda when a GPU is there, else cpu
    resume: bool = False


# --- data --------------------------------------------------------------------------------------


def load_data(cfg: TrainConfig, spec: InputSpec) -> DataSet:
    """Train photos kept a little larger than the crop (augmentation zooms); val ones prepared."""
    keep = round(spec.resize * 1.25)
    return ingest(cfg.data,
                  train_transform=lambda img: resize_shorter(img, keep)
                  if min(img.shape[:2]) > keep else img,
                  val_transform=lambda img: prepare(img, spec))


def class_weights(labels: list[int], n: int) -> torch.Tensor:
    """Inverse-frequency weights (mean 1 over present classes), so rare products count fully."""
    counts = np.bincount(labels, minlength=n).astype(np.float64)
    w = np.where(counts > 0, len(labels) / (n * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w / w[counts > 0].mean(), dtype=torch.float32)


def batches(n: int, size: int, rng: np.random.Generator) -> list[np.ndarray]:
    order = rng.permutation(n)
    return [order[i : i + size] for i in range(0, n - size + 1, size)] or [order]


# --- evaluation --------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    return torch.device("cuda" if name == "auto" and torch.cuda.is_available()
                        else "cpu" if name == "auto" else name)


@torch.no_grad()
def predict(model: Recognizer, inputs: list[np.ndarray], batch_size: int = 64
            ) -> dict[str, np.ndarray]:
    """Run prepared inputs through the model in eval mode: {embedding, fine, coarse} arrays."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, list[np.ndarray]] = {"embedding": [], "fine": [], "coarse": []}
    for i in range(0, len(inputs), batch_size):
        x = torch.from_numpy(np.stack(inputs[i : i + batch_size])).to(device)
        for name, y in zip(out, model(x), strict=True):
            out[name].append(y.cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def evaluate_split(model: Recognizer, split: Split) -> tuple[Report, dict[str, np.ndarray]]:
    out = predict(model, split.images)
    report = evaluate_scores(out["fine"], np.array(split.fine), out["coarse"],
                             np.array(split.coarse))
    return report, out


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
                             scale=ckpt["config"]["scale"])
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model, ckpt


# --- the loop ----------------------------------------------------------------------------------


def train(cfg: TrainConfig) -> Path:
    """Train as configured; returns the path of the best checkpoint."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = input_spec(cfg.arch, cfg.size)

    data = load_data(cfg, spec)
    print(describe(data))
    labels: Labels = data.labels
    device = pick_device(cfg.device)
    model = build_recognizer(cfg.arch, len(labels.fine), len(labels.coarse), cfg.weights,
                             cfg.embed_dim, cfg.scale).to(device)
    print(f"training {cfg.arch} at {cfg.size} px on {device}")
    heads = {id(p) for p in model.head_parameters()}
    optimizer = torch.optim.SGD(
        [{"params": [p for p in model.parameters() if id(p) not in heads], "lr_mult": 1.0},
         {"params": model.head_parameters(), "lr_mult": cfg.head_lr_mult}],
        lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    fine_w = class_weights(data.train.fine, len(labels.fine)).to(device)
    coarse_w = class_weights(data.train.coarse, len(labels.coarse)).to(device)

    steps_per_epoch = max(1, len(data.train) // cfg.batch_size)
    total_steps, warmup = cfg.epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch
    start_epoch, best_top1, history = 0, -1.0, []
    if cfg.resume and (out / "last.pt").exists():
        ckpt = torch.load(out / "last.pt", map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"].cpu())
        start_epoch, best_top1, history = ckpt["epoch"], ckpt["best_top1"], ckpt["history"]
        print(f"resumed from {out / 'last.pt'} after epoch {start_epoch}")

    def lr_at(step: int) -> float:
        if step < warmup:
            return cfg.lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        t0, seen, loss_sum = time.time(), 0, 0.0
        bar = tqdm(batches(len(data.train), cfg.batch_size, rng), desc=f"epoch {epoch + 1}/"
                   f"{cfg.epochs}", unit="batch", leave=False, disable=None)
        for i, idx in enumerate(bar):
            step = epoch * steps_per_epoch + i
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step) * group["lr_mult"]
            x = torch.from_numpy(np.stack([augment(data.train.images[j], spec, rng)
                                           for j in idx])).to(device)
            y_fine = torch.tensor([data.train.fine[j] for j in idx], device=device)
            y_coarse = torch.tensor([data.train.coarse[j] for j in idx], device=device)
            _, fine, coarse = model(x)
            loss = (F.cross_entropy(fine, y_fine, weight=fine_w)
                    + cfg.coarse_weight * F.cross_entropy(coarse, y_coarse, weight=coarse_w))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(idx)
            loss_sum += loss.item() * len(idx)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", lr=f"{lr_at(step):.4f}")

        report, _ = evaluate_split(model, data.val) if len(data.val) else (None, None)
        val = report.to_dict() if report else {}
        history.append({"epoch": epoch + 1, "loss": loss_sum / max(seen, 1),
                        "seconds": time.time() - t0, **val})
        top1 = val.get("fine_top1", -loss_sum / max(seen, 1))
        print(f"epoch {epoch + 1}/{cfg.epochs}: loss {loss_sum / max(seen, 1):.3f}"
              + (f", val product top-1 {val['fine_top1']:.3f}, category top-1 "
                 f"{val['coarse_top1']:.3f}" if val else "")
              + f" ({time.time() - t0:.0f} s)")
        state = {
            "model": {k: v.cpu() for k, v in model.state_dict().items()},
            "config": asdict(cfg),
            "labels": {"fine": labels.fine, "coarse": labels.coarse,
                       "coarse_of_fine": labels.coarse_of_fine},
            "input": spec.to_dict(),
            "epoch": epoch + 1,
            "val": val,
            "best_top1": max(best_top1, top1),
            "history": history,
            "optimizer": optimizer.state_dict(),
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
        }
        save_checkpoint(out / "last.pt", state)
        if top1 > best_top1:
            best_top1 = top1
            save_checkpoint(out / "best.pt", {k: v for k, v in state.items()
                                              if k not in ("optimizer", "rng", "torch_rng")})
    (out / "history.json").write_text(json.dumps(history, indent=2) + "\n")
    print(f"best val product top-1 {best_top1:.3f}: {out / 'best.pt'}")
    return out / "best.pt"
