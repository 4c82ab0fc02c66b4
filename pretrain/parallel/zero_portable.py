"""A ZeRO checkpoint that resumes on another world size and ZeRO stage, RV state included.

DeepSpeed's own files hold each rank's flat partitions, cut by world size and stage; they resume
only where they were written. Beside them every rank writes `state/portable/rank<R>.safetensors`:
for each run of elements it owns (a `Segment` of a `SegmentMap`), the fp32 master weights and
every per-element optimizer buffer (exp_avg, ...) of that run, keyed `name/start/what`. Rank 0
adds the per-neuron RV state (`name/neurons/neuron_norm`, `.../update_norm_avg`: the same on every
rank, the sums behind them are all-reduced) and the scalars (`-/scalar/step`). That is DeepSpeed's
"universal checkpoint" idea, written at save time, with our own segment maps (which know the RV
state DeepSpeed's converter drops) and without pickle.

Loading assembles each tensor's full master weights and buffers from all the files and cuts them
along the *new* segment maps: into the new fp32 partitions, the optimizer state, and the model's
low-precision parameters (the full replicas under ZeRO 1/2, the partitions and persistent
parameters under ZeRO 3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pretrain.errors import UserError

PER_NEURON = ("neuron_norm", "update_norm_avg")
_SCALAR = "-/scalar"


def save_portable(maps: dict, optimizer: torch.optim.Optimizer, folder: Path, rank: int) -> None:
    """This rank's runs of master weights and optimizer buffers (and, on rank 0, the per-neuron state)."""
    out: dict[str, torch.Tensor] = {}
    for flat, (segment_map, _, _) in maps.items():
        state = optimizer.state[flat]
        elementwise = {"master": flat, **{k: v for k, v in state.items()
                                          if torch.is_tensor(v) and v.numel() == flat.numel() and v.dim() == 1}}
        for seg in segment_map.segments:
            name = segment_map.tensors[seg.tensor].name
            for what, values in elementwise.items():
                out[f"{name}/{seg.start}/{what}"] = values[seg.offset:seg.offset + seg.length]
        if rank == 0:
            for k, info in enumerate(segment_map.tensors):
                base = segment_map.base[k]
                for what in PER_NEURON:
                    if what in state:
                        out[f"{info.name}/neurons/{what}"] = state[what][base:base + info.num_neurons]
            for what, value in state.items():
                if torch.is_tensor(value) and value.dim() == 0:
                    out[f"{_SCALAR}/{what}"] = value.reshape(1)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in out.items()},
              str(folder / f"rank{rank:05d}.safetensors"))


def load_portable(maps: dict, optimizer: torch.optim.Optimizer, zero_optimizer: Any, stage: int,
                  folder: Path) -> None:
    """Set master weights, optimizer state and model parameters from the portable files, cut for this rank."""
    infos = {info.name: info for segment_map, _, _ in maps.values() for info in segment_map.tensors}
    full, neurons, scalars = _assemble(folder, infos)
    for j, (flat, (segment_map, originals, _)) in enumerate(maps.items()):
        state = optimizer.state[flat]
        whats = sorted({what for parts in full.values() for what in parts})
        for what in whats:
            target = flat.data if what == "master" else state.setdefault(what, torch.zeros_like(flat))
            for seg in segment_map.segments:
                name = segment_map.tensors[seg.tensor].name
                target[seg.offset:seg.offset + seg.length] = full[name][what][seg.start:seg.start + seg.length]
        for what in PER_NEURON:
            parts = [neurons.get((info.name, what)) for info in segment_map.tensors]
            if any(p is not None for p in parts):
                if any(p is None for p in parts):
                    raise UserError(f"{folder} lacks {what} of some tensors of a rotational group; it cannot resume")
                state[what] = torch.cat(parts).to(flat.device)
        for what, value in scalars.items():
            state[what] = value.to(scalar_device(optimizer, flat), copy=True)
        _write_model_params(zero_optimizer, stage, j, flat, originals, [info.name for info in segment_map.tensors],
                            full)


def scalar_device(optimizer: torch.optim.Optimizer, flat: torch.Tensor) -> torch.device:
    """Where `optimizer` keeps `flat`'s step count: torch's fused or capturable AdamW reads it on the
    parameter's device (its own `load_state_dict` puts it there); ours, like torch's other steps, on the host."""
    settings = optimizer.defaults  # not its groups: ZeRO-3 empties them outside a step
    on_device = isinstance(optimizer, torch.optim.AdamW) and (settings.get("fused") or settings.get("capturable"))
    return flat.device if on_device else torch.device("cpu")


def _assemble(folder: Path, infos: dict) -> tuple[dict, dict, dict]:
    files = sorted(folder.glob("rank*.safetensors"))
    if not files:
        raise UserError(f"{folder} holds no portable ZeRO state; this checkpoint resumes only on its own world size "
                        "and stage")
    full: dict[str, dict[str, torch.Tensor]] = {}
    covered: dict[tuple[str, str], int] = {}
    neurons: dict[tuple[str, str], torch.Tensor] = {}
    scalars: dict[str, torch.Tensor] = {}
    for path in files:
        for key, values in load_file(str(path)).items():
            name, where, what = key.rsplit("/", 2)
            if f"{name}/{where}" == _SCALAR:
                scalars[what] = values.reshape(())
            elif where == "neurons":
                neurons[(name, what)] = values
            else:
                if name not in infos:
                    raise UserError(f"{path} holds {name}, which this model does not have; resume with the run's "
                                    "own model config")
                numel = torch.Size(infos[name].shape).numel()
                tensor = full.setdefault(name, {}).setdefault(what, torch.zeros(numel))
                start = int(where)
                tensor[start:start + len(values)] = values
                covered[(name, what)] = covered.get((name, what), 0) + len(values)
    for (name, what), count in covered.items():
        if count != torch.Size(infos[name].shape).numel():
            raise UserError(f"{folder} covers {count} of the elements of {name} ({what}); a rank's file is missing")
    missing = set(infos) - set(full)
    if missing:
        raise UserError(f"{folder} has no state for {sorted(missing)[0]}; a rank's file is missing")
    return full, neurons, scalars


def _write_model_params(zero_optimizer: Any, stage: int, j: int, flat: torch.Tensor, originals: list,
                        names: list[str], full: dict) -> None:
    """The model's (low-precision) parameters from the loaded master weights; `names` follow `originals`."""
    with torch.no_grad():
        if stage in (1, 2):  # every rank holds full replicas: write them whole
            for p, name in zip(originals, names, strict=True):
                p.data.copy_(full[name]["master"].view(p.shape).to(p.dtype))
            return
        # ZeRO 3: the partition (same layout as the fp32 one) and the parameters kept whole ("persistent")
        lp_flat = zero_optimizer.fp16_partitioned_groups_flat[j]
        lp_flat.data.copy_(flat.data.to(lp_flat.dtype))
        for p, name in zip(originals, names, strict=True):
            if p.data.numel() == p.ds_numel:
                p.data.copy_(full[name]["master"].view(p.ds_shape).to(p.dtype))
