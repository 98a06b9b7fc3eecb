"""The recognition network: an ImageNet backbone with three heads, and an optional fourth.

- embedding: L2-normalised vector (default 256-d); products are recognised by the nearest
  reference embedding, so a product enrolled from a few photos needs no retraining. With a
  `feature_weight` w > 0 it is the trained embedding joined with the backbone's pooled
  features, each unit length and weighted so that the cosine of two such embeddings is
  (1 - w) x cosine(trained) + w x cosine(features): the features keep what training on its
  products gave the trained part no reason to learn, which might tell a product it never saw
  from its neighbours (on Grocery it did not: bench/feature_weight.py chose w = 0);
- fine: product logits of a cosine classifier (normalised softmax), whose class weights are
  themselves unit embeddings: the bundle ships them as one prototype per trained product;
- coarse: category logits from the backbone features;
- attributes (only when built with `num_attributes` > 0, i.e. the catalog has attribute labels
  such as colour or pattern): independent multi-label logits from the backbone features, so a
  photo can carry several attributes or none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models import efficientnet_lite, resnet
from models.bundle import ATTRIBUTES, OUTPUTS
from models.preprocess import InputSpec
from models.weights import WeightsError, load_weights_file

ARCHITECTURES = {
    "resnet18": (resnet.resnet18, resnet),
    "resnet34": (resnet.resnet34, resnet),
    "resnet50": (resnet.resnet50, resnet),
    "resnet101": (resnet.resnet101, resnet),
    "efficientnet_lite0": (efficientnet_lite.efficientnet_lite0, efficientnet_lite),
    "efficientnet_lite1": (efficientnet_lite.efficientnet_lite1, efficientnet_lite),
    "efficientnet_lite2": (efficientnet_lite.efficientnet_lite2, efficientnet_lite),
}


def input_spec(arch: str, size: int = 224) -> InputSpec:
    """The ImageNet preprocessing of `arch`, at `size` (resized to size*256/224 then cropped)."""
    family = ARCHITECTURES[arch][1]
    return InputSpec(size=size, resize=round(size * 256 / 224), mean=family.INPUT_MEAN,
                     std=family.INPUT_STD)


def build_backbone(arch: str, weights: str = "imagenet") -> nn.Module:
    """`weights`: 'imagenet' (published checkpoint), 'none' (random init) or a checkpoint path."""
    if arch not in ARCHITECTURES:
        raise WeightsError(f"unknown architecture '{arch}' (choose from "
                           f"{', '.join(ARCHITECTURES)})")
    make, family = ARCHITECTURES[arch]
    net = make()
    if weights == "imagenet":
        if family is resnet:
            resnet.load_imagenet(net, arch)
        else:
            family.load_imagenet(net)
    elif weights != "none":
        load_weights_file(net, weights)
    return net


BN_MOMENTUM = 0.1  # fine-tuning runs few steps: running statistics must follow quickly


class Recognizer(nn.Module):
    def __init__(self, backbone: nn.Module, num_fine: int, num_coarse: int,
                 embed_dim: int = 256, scale: float = 16.0, dropout: float = 0.2,
                 num_attributes: int = 0, feature_weight: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= feature_weight < 1.0:
            raise ValueError(f"feature_weight {feature_weight}: must be in [0, 1)")
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = BN_MOMENTUM
        self.backbone = backbone
        features = backbone.num_features
        self.scale = scale
        self.feature_weight = feature_weight  # not a weight: chosen at export, see embed()
        self.neck = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, embed_dim),
                                  nn.BatchNorm1d(embed_dim))
        self.fine = nn.Parameter(torch.randn(num_fine, embed_dim) * 0.01)
        self.coarse = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_coarse))
        # built last and only when asked, so a model without it initialises exactly as before
        self.attributes = (nn.Sequential(nn.Dropout(dropout), nn.Linear(features, num_attributes))
                           if num_attributes else None)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Names of what forward returns, in order: the bundle's outputs."""
        return OUTPUTS + ((ATTRIBUTES,) if self.attributes is not None else ())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.heads(self.backbone.forward_features(x))

    @property
    def embedding_dim(self) -> int:
        trained = self.neck[1].out_features
        return trained + self.backbone.num_features if self.feature_weight else trained

    def heads(self, f: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(embedding, fine, coarse[, attributes]) from pooled backbone features."""
        trained = F.normalize(self.neck(f), dim=1)
        fine = self.scale * trained @ self.prototypes().t()
        embedding = self.embed(trained, f)
        if self.attributes is None:
            return embedding, fine, self.coarse(f)
        return embedding, fine, self.coarse(f), self.attributes(f)

    def embed(self, trained: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The matching embedding from the unit trained embedding and the pooled features."""
        if not self.feature_weight:
            return trained
        w = self.feature_weight
        return torch.cat([math.sqrt(1 - w) * trained,
                          math.sqrt(w) * F.normalize(features, dim=1)], dim=1)

    def prototypes(self) -> torch.Tensor:
        return F.normalize(self.fine, dim=1)

    def head_parameters(self) -> list[nn.Parameter]:
        extra = [*self.attributes.parameters()] if self.attributes is not None else []
        return [*self.neck.parameters(), self.fine, *self.coarse.parameters(), *extra]


class FlipAveraged(nn.Module):
    """A recognizer that sees each photo and its mirror image and averages the two pooled
    features before the heads: test-time augmentation inside the exported graph, so every
    engine (ONNX Runtime, TensorRT) runs it with no code of its own, and reference photos and
    scans are embedded the same way. One pass over a doubled batch."""

    def __init__(self, model: Recognizer) -> None:
        super().__init__()
        self.model = model

    @property
    def output_names(self) -> tuple[str, ...]:
        return self.model.output_names

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        f = self.model.backbone.forward_features(torch.cat([x, x.flip(3)]))
        n = x.shape[0]
        return self.model.heads((f[:n] + f[n:]) / 2)


def build_recognizer(arch: str, num_fine: int, num_coarse: int, weights: str = "imagenet",
                     embed_dim: int = 256, scale: float = 16.0,
                     num_attributes: int = 0) -> Recognizer:
    return Recognizer(build_backbone(arch, weights), num_fine, num_coarse, embed_dim, scale,
                      num_attributes=num_attributes)
