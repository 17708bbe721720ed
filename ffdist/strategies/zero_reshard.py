"""A ZeRO-1/2/3 checkpoint resumed at another world size: ffdist's own conversion.

DeepSpeed's files hold each rank's partition of the fp32 master weights and of the
optimizer states, cut for the world size that wrote them. To continue at another one,
`convert` (rank 0 only) reads the N ranks' files of a checkpoint folder and writes
<folder>/resharded/state.pt, which holds no partition: for every trainable parameter (by
name) its full fp32 master and each optimizer state of that size (any key: Adam's
exp_avg/exp_avg_sq, SGD's momentum_buffer, ...), the optimizer's per-group scalars
(Adam's step), the frozen parameters, the buffers, the engine's counters and the fp16
loss scaler's numbers. It is written into a temp folder that is renamed into place
(os.replace), so a `resharded` folder that exists is complete; one conversion serves every
later resume, at any world size. The DeepSpeed files themselves are never touched.
`load` (every rank, after a barrier) then cuts its own partitions out of the full tensors,
as the live engine lays them out: ZeRO-1/2 through each parameter's `_hp_mapping` (the
fragment of the flat fp32 partition it owns), ZeRO-3 through `ds_tensor.ds_numel` (the
padded partition size: rank r owns elements [r*n, (r+1)*n) of the flattened parameter).

Why not DeepSpeed's universal checkpoint (deepspeed.checkpoint.ds_to_universal, then
`checkpoint: {load_universal: true}`): in DeepSpeed 0.19 both the conversion and the
ZeRO-3 universal loader know only Adam's states by name (exp_avg, exp_avg_sq); a
checkpoint of SGD with momentum, ffdist's default optimizer, fails the conversion with
KeyError 'exp_avg'. The layout read here is the one ds_to_universal reads (the
`param_slice_mappings` of ZeRO-1/2, the `fp32_flat_groups` and `param_shapes` of ZeRO-3).

Memory: convert holds the full fp32 state once in rank 0's host memory; load memory-maps
state.pt, so each rank pages in what it copies.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ffdist.errors import CheckpointError

FOLDER = "resharded"
STATE = "state.pt"
_OPTIM = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def saved_world_size(folder: Path) -> int:
    """How many ranks wrote the DeepSpeed files in `folder` (one optimizer file each)."""
    return len(_optim_files(folder))


def _optim_files(folder: Path) -> list[Path]:
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir()
             if (m := _OPTIM.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _deepspeed_classes() -> list:
    """The DeepSpeed classes its checkpoint files pickle besides tensors and containers
    (torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-1/2/3 files, fp32/bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, fragment_address, LossScaler, DynamicLossScaler]


def _load(path: Path) -> Any:
    # weights_only with DeepSpeed's few classes allowed by name: a checkpoint folder is
    # never a way to run code, not even one DeepSpeed wrote
    with torch.serialization.safe_globals(_deepspeed_classes()):
        return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------ convert

def convert(folder: Path) -> Path:
    """Write <folder>/resharded/state.pt from the ZeRO files in `folder` (rank 0 only;
    reused when it exists) and return its path."""
    folder = Path(folder)
    out = folder / FOLDER
    if (out / STATE).is_file():
        return out / STATE
    for stale in folder.glob(f".{FOLDER}.tmp.*"):  # a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    optim = [_load(p)["optimizer_state_dict"] for p in _optim_files(folder)]
    if not optim:
        raise CheckpointError(f"{folder} holds no DeepSpeed optimizer files; the checkpoint "
                              "is incomplete, remove that folder to resume from the one before.")
    stage = int(optim[0].get("zero_stage", 1))  # BF16_Optimizer (ZeRO-1 in bf16) omits it
    model = folder / ("zero_pp_rank_0_mp_rank_00_model_states.pt" if stage == 3
                      else "mp_rank_00_model_states.pt")
    wrote = _load(model).get("dp_world_size", len(optim)) if model.is_file() else None
    if wrote != len(optim):
        raise CheckpointError(f"{folder} holds {len(optim)} DeepSpeed optimizer files of the "
                              f"{wrote or 'unknown number of'} ranks that wrote it; the "
                              "checkpoint is incomplete, remove that folder to resume from "
                              "the one before.")
    state = _stage3(folder, optim) if stage == 3 else _stage12(folder, optim)
    state["stage"], state["from_world"] = stage, len(optim)
    scaler = optim[0].get("loss_scaler")
    state["loss_scaler"] = {k: v for k, v in vars(scaler).items()
                            if isinstance(v, (int, float, bool))} if scaler is not None else {}
    tmp = folder / f".{FOLDER}.tmp.{os.getpid()}"
    tmp.mkdir()
    with open(tmp / STATE, "wb") as f:  # on disk before the rename makes it count
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)
    return out / STATE


def _scalars(base_state: dict[int, dict[str, Any]], sizes: list[int]) -> list[dict[str, Any]]:
    """Per param group, the optimizer states that are not partitions (e.g. Adam's step)."""
    return [{k: v for k, v in base_state.get(g, {}).items()
             if not (torch.is_tensor(v) and v.dim() == 1 and v.numel() >= sizes[g])}
            for g in range(len(sizes))]


def _flat_keys(group_state: dict[str, Any], size: int) -> list[str]:
    return [k for k, v in group_state.items()
            if torch.is_tensor(v) and v.dim() == 1 and v.numel() >= size]


def _stage12(folder: Path, optim: list[dict[str, Any]]) -> dict[str, Any]:
    """ZeRO-1/2: rank r's flat fp32 partition of group g holds, for each parameter it
    touches, the fragment param_slice_mappings names (start in the partition, numel); the
    fragments of a parameter, in rank order, are its flattened values."""
    model = _load(folder / "mp_rank_00_model_states.pt")
    shapes = {n: s for group in model["param_shapes"] for n, s in group.items()}
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    for osd in optim:
        base = osd["base_optimizer_state"]["state"]
        for g, (fp32, mapping) in enumerate(zip(osd["single_partition_of_fp32_groups"],
                                                osd["param_slice_mappings"])):
            flats = {"fp32": fp32, **{k: base[g][k] for k in _flat_keys(base.get(g, {}),
                                                                        fp32.numel())}}
            for name, frag in mapping.items():
                mine = pieces.setdefault(name, {})
                for key, flat in flats.items():
                    mine.setdefault(key, []).append(flat.narrow(0, frag.start, frag.numel))
    params = {name: {k: torch.cat(v).view(shapes[name]).clone() for k, v in states.items()}
              for name, states in pieces.items()}
    sizes = [t.numel() for t in optim[0]["single_partition_of_fp32_groups"]]
    module = model["module"]
    return {"params": params,
            "frozen": {k: module[k] for k in model.get("frozen_param_shapes") or {}},
            "buffers": {k: module[k] for k in model.get("buffer_names") or [] if k in module},
            "scalars": _scalars(optim[0]["base_optimizer_state"]["state"], sizes),
            "counters": {k: model.get(k) for k in _COUNTERS}}


def _stage3(folder: Path, optim: list[dict[str, Any]]) -> dict[str, Any]:
    """ZeRO-3: sub-group i of rank r's flat fp32 partition holds its parameters one after
    the other (param_shapes order), ceil(numel / N) elements each: elements [r*n, (r+1)*n)
    of the flattened parameter, zero-padded at the end."""
    world = len(optim)
    models = [_load(folder / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt")
              for r in range(world)]
    groups = models[0]["param_shapes"]
    pieces: dict[str, dict[str, list[torch.Tensor]]] = {}
    for osd in optim:
        base = osd["optimizer_state_dict"]["state"]
        for i, (fp32, shapes) in enumerate(zip(osd["fp32_flat_groups"], groups)):
            flats = {"fp32": fp32, **{k: base[i][k] for k in _flat_keys(base.get(i, {}),
                                                                        fp32.numel())}}
            offset = 0
            for name, shape in shapes.items():
                n = -(-_numel(shape) // world)
                mine = pieces.setdefault(name, {})
                for key, flat in flats.items():
                    mine.setdefault(key, []).append(flat.narrow(0, offset, n))
                offset += n
    shapes = {n: s for group in groups for n, s in group.items()}
    params = {name: {k: torch.cat(v)[:_numel(shapes[name])].view(shapes[name]).clone()
                     for k, v in states.items()} for name, states in pieces.items()}
    frozen: dict[str, torch.Tensor] = {}
    for name, shape in (models[0].get("frozen_param_shapes") or {}).items():
        parts = [m["frozen_param_fragments"][name].flatten() for m in models]
        frozen[name] = torch.cat(parts)[:_numel(shape)].view(shape).clone()
    module = models[0]["module"]
    sizes = [t.numel() for t in optim[0]["fp32_flat_groups"]]
    return {"params": params, "frozen": frozen,
            "buffers": {k: module[k] for k in models[0].get("buffer_names") or []
                        if k in module},
            "scalars": _scalars(optim[0]["optimizer_state_dict"]["state"], sizes),
            "counters": {k: models[0].get(k) for k in _COUNTERS}}


def _numel(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ------------------------------------------------------------------------------ load

def load(engine: Any, state_file: Path, rank: int, world: int) -> None:
    """Set this rank's partitions of the live `engine` from the full state in `state_file`
    (written by convert; every rank calls this)."""
    state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=True)
    module, opt = engine.module, engine.optimizer
    named = dict(module.named_parameters())
    missing = sorted(set(state["params"]) - set(named)) + sorted(
        n for n, p in named.items() if p.requires_grad and n not in state["params"])
    if missing:
        raise CheckpointError(f"{state_file.parent.parent} does not hold the parameters of "
                              f"this model (first: {missing[0]}); resume with the model it "
                              "was trained with.")
    with torch.no_grad():
        if state["stage"] == 3:
            _load_stage3(opt, named, state, rank, world)
        else:
            _load_stage12(opt, named, state)
        _set_module(module, state)
    for k, v in state["counters"].items():
        if v is not None:
            setattr(engine, k, v)
    scaler = getattr(opt, "loss_scaler", None)
    for k, v in state["loss_scaler"].items():
        if scaler is not None and hasattr(scaler, k):
            setattr(scaler, k, v)


def _load_stage12(opt: Any, named: dict[str, torch.nn.Parameter], state: dict[str, Any]) -> None:
    base = opt.optimizer
    flats: dict[int, dict[str, torch.Tensor]] = {}  # group -> key -> this rank's flat state
    for name, full in state["params"].items():
        p, mapping = named[name], getattr(named[name], "_hp_mapping", None)
        p.data.copy_(full["fp32"].to(p.dtype))  # the module's full (low-precision) weight
        if mapping is None:  # this rank owns no fragment of it
            continue
        g, hp, lp = mapping.param_group_index, mapping.hp_fragment_address, \
            mapping.lp_fragment_address
        flat_param = base.param_groups[g]["params"][0]
        group = flats.setdefault(g, {})
        for key, value in full.items():
            target = mapping.hp_fragment if key == "fp32" else group.setdefault(
                key, torch.zeros_like(flat_param))
            if key != "fp32":
                target = target.narrow(0, hp.start, hp.numel)
            target.copy_(value.flatten().narrow(0, lp.start, lp.numel))
    for g, group in flats.items():
        flat_param = base.param_groups[g]["params"][0]
        base.state[flat_param] = {**_scalar_state(state, g), **group}
    for p in named.values():  # let DeepSpeed's tensor-fragment API see the new states
        mapping = getattr(p, "_hp_mapping", None)
        if mapping is not None:
            flat_param = base.param_groups[mapping.param_group_index]["params"][0]
            mapping.set_optim_state_fragment(flat_param, base.state[flat_param])


def _load_stage3(opt: Any, named: dict[str, torch.nn.Parameter], state: dict[str, Any],
                 rank: int, world: int) -> None:
    base, name_of = opt.optimizer, {id(p): n for n, p in named.items()}
    for i, group in enumerate(opt.fp16_groups):
        flat_param = opt.fp32_partitioned_groups_flat[i]
        flats: dict[str, torch.Tensor] = {}
        offset = 0
        for p in group:
            n = p.ds_tensor.ds_numel  # the padded partition size
            for key, full in state["params"][name_of[id(p)]].items():
                padded = torch.zeros(n * world, dtype=torch.float32)
                padded[:full.numel()] = full.flatten()
                piece = padded.narrow(0, rank * n, n)
                flats.setdefault(key, torch.zeros_like(flat_param)).narrow(
                    0, offset, n).copy_(piece)
            offset += n
            _set_full(p, state["params"][name_of[id(p)]]["fp32"])
        if "fp32" in flats:
            flat_param.data.copy_(flats.pop("fp32"))
        base.state[flat_param] = {**_scalar_state(state, i), **flats}  # i: sub-group


def _set_full(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """A ZeRO-3 parameter's low-precision weights, through DeepSpeed's public way of
    modifying one (gathered, changed, partitioned again) rather than by writing its
    partition `ds_tensor` behind DeepSpeed's back: that way also covers the parameters it
    keeps gathered (stage3_param_persistence_threshold). A collective: every rank calls it
    for the same parameters in the same order."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
        p.data.copy_(value.view_as(p.data).to(p.dtype))


def _scalar_state(state: dict[str, Any], group: int) -> dict[str, Any]:
    found = state["scalars"]
    scalars = found[group] if group < len(found) else (found[0] if found else {})
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()}


def _set_module(module: torch.nn.Module, state: dict[str, Any]) -> None:
    """Buffers (BatchNorm statistics, never partitioned) and frozen weights (no master)."""
    buffers = dict(module.named_buffers())
    for name, value in state["buffers"].items():
        if name in buffers and value is not None:
            buffers[name].copy_(value.to(buffers[name].dtype))
    if state["frozen"]:
        params = dict(module.named_parameters())
        for name, value in state["frozen"].items():
            p = params[name]
            if hasattr(p, "ds_id"):
                _set_full(p, value)
            else:
                p.data.copy_(value.to(p.dtype))
