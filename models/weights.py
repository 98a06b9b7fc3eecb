"""Loading checkpoints into our networks, with one clear error line for every way it can fail.

Checkpoints are always read with `weights_only=True`: a .pth file is a pickle, and a pickle
from the internet or a colleague's laptop must not be able to run code on the trainer.
torch is imported where it is used, so `WeightsError` can be caught without it installed.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

SHOWN_KEYS = 3  # key names quoted in a mismatch message; the count says how many more


class WeightsError(RuntimeError):
    """Weights that cannot be used; str() is one line naming the source and the problem."""


def one_line(exc: object) -> str:
    """The first meaningful line of an exception, for messages that must stay on one line."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:  # torch buries the useful part under advice
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN_KEYS])
    return shown + (", ..." if len(keys) > SHOWN_KEYS else "")


def load_state_dict(model: nn.Module, state_dict: Mapping[str, object], source: str) -> None:
    """Load strictly: a silently half-loaded network trains fine and recognises nothing."""
    import torch

    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise WeightsError(
            f"{source}: checkpoint does not match the network: {len(missing)} missing keys"
            f"{' (' + _names(missing) + ')' if missing else ''}, {len(unexpected)} unexpected "
            f"keys{' (' + _names(unexpected) + ')' if unexpected else ''}"
        )
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        raise WeightsError(f"{source}: {len(not_tensors)} entries are not tensors "
                           f"({_names(not_tensors)})")
    wrong = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    if wrong:
        raise WeightsError(
            f"{source}: {len(wrong)} tensors have the wrong shape (checkpoint vs network: "
            f"{_names(wrong)}); is num_classes or the architecture different?"
        )
    model.load_state_dict(state_dict, strict=True)


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint: a raw state_dict, or a dict with a "model"/"state_dict" entry."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = one_line(exc)
        if reason.startswith("Unsupported global"):
            raise WeightsError(
                f"{path}: refused by torch.load(weights_only=True): it holds Python objects, "
                f"not only tensors ({reason.split(' was not an allowed')[0]})"
            ) from exc
        raise WeightsError(f"{path}: not a torch checkpoint ({reason})") from exc
    except Exception as exc:  # torch.load reports corrupt files with many exception types
        raise WeightsError(f"{path}: not a readable torch checkpoint "
                           f"({type(exc).__name__}: {one_line(exc)})") from exc
    if not isinstance(checkpoint, Mapping):
        raise WeightsError(f"{path}: holds a {type(checkpoint).__name__}, not a state_dict")
    for key in ("model", "state_dict"):
        if isinstance(checkpoint.get(key), Mapping):
            checkpoint = checkpoint[key]
            break
    load_state_dict(model, checkpoint, str(path))
