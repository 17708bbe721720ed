"""Reading model weights from a file: an ffdist checkpoint (its raw weights or their EMA),
a run's model.pt, or a plain (torchvision) state dict.

Used by fine-tuning (`model.pretrained=PATH`, ffdist.finetune) and by the commands that
read a finished run (ffdist.loading), so both read a file the same way.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ffdist.checkpoint import load_torch
from ffdist.ckpt_format import BEST
from ffdist.errors import CheckpointError
from ffdist.state_dicts import clean_state_dict


def state_dict_from(path: str | Path, weights: str | None = "raw",
                    plain_holds: str | None = None) -> dict[str, torch.Tensor]:
    """Model weights from an ffdist checkpoint, a run's model.pt or a plain state dict
    (`read_weights`, without saying which kind they are)."""
    return read_weights(path, weights, plain_holds)[0]


def read_weights(path: str | Path, weights: str | None = None,
                 plain_holds: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """Model weights from an ffdist checkpoint ({"model": ...}), a run's model.pt or a plain
    (torchvision) state dict, read with weights_only=True, and which they are (raw | ema).
    Any checkpoint format version will do: only its "model" (raw) or its EMA section (ema)
    is read (ffdist.ckpt_format). `weights` None: a best.pt's own (the weights its `best`
    section was measured on), else `plain_holds`, else raw. A plain state dict is what it
    is: `plain_holds` names which weights it holds (a run's model.pt: its
    checkpoint.final_weights), checked against `weights`."""
    if Path(path).is_dir():
        raise CheckpointError(f"{path} is a checkpoint folder of shards (e.g. DeepSpeed "
                              "ZeRO's), whose weights are split over the ranks' files; give the "
                              "run's model.pt or checkpoints/best.pt (consolidated weights) "
                              "instead.")
    obj = load_torch(path)
    if isinstance(obj, dict) and ("format" in obj or isinstance(obj.get("model"), dict)):
        best = obj.get(BEST)
        kind = weights or (best.get("weights") if isinstance(best, dict) else None) \
            or plain_holds or "raw"
        obj = _checkpoint_weights(obj, kind, path)
    else:
        kind = weights or plain_holds or "raw"
        if plain_holds is not None and kind != plain_holds:
            raise CheckpointError(
                f"{path} holds the {plain_holds} weights only (checkpoint.final_weights="
                f"{plain_holds}); the {kind} ones are in the run's checkpoints: pass "
                "--checkpoint <run>/checkpoints/best.pt (or a step_*.pt) with it.")
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no model state dict; give an ffdist checkpoint, "
                              "a run's model.pt or a plain state dict of tensors.")
    return clean_state_dict(obj), kind


def _checkpoint_weights(obj: dict, weights: str, path: str | Path) -> object:
    if weights == "raw":
        return obj.get("model")
    ema = obj.get("ema")
    if not isinstance(ema, dict) or not isinstance(ema.get("shadow"), dict):
        raise CheckpointError(f"{path} holds no EMA of the weights (its run trained with "
                              "optim.ema_decay=0); use --weights raw.")
    return ema["shadow"]
