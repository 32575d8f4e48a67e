"""The optimizer's and the RNGs' states as files of a checkpoint: safetensors for tensors, JSON for the
rest, so that loading a checkpoint unpickles nothing."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from malora_train.run_dir import atomic_write, read_json, write_json_atomic


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Optimizer state as safetensors (tensors) + JSON (hyper-parameters): no pickle."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for name, value in param_state.items():
            if torch.is_tensor(value):
                tensors[f"{param_id}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{name}"] = value
    atomic_write(folder / "optimizer.safetensors", lambda path: save_file(tensors, str(path)))
    write_json_atomic(folder / "optimizer.json", {"param_groups": json_numbers(state["param_groups"]),
                                                  "scalars": scalars})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """The saved state into ``optimizer``; hyper-parameters it holds as tensors (a capturable optimiser's
    learning rate) stay tensors, on their device."""
    meta = read_json(folder / "optimizer.json")
    tensors = load_file(str(folder / "optimizer.safetensors"))
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    held = [{k: v for k, v in group.items() if torch.is_tensor(v)} for group in optimizer.param_groups]
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    for group, tensor_values in zip(optimizer.param_groups, held):
        for key, old in tensor_values.items():
            if not torch.is_tensor(group[key]):
                group[key] = torch.tensor(group[key], dtype=old.dtype, device=old.device)


def json_numbers(value: Any) -> Any:
    """``value`` with its one-element tensors as numbers (JSON has no tensors)."""
    if torch.is_tensor(value) and value.numel() == 1:
        return value.item()
    if isinstance(value, dict):
        return {k: json_numbers(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_numbers(v) for v in value]
    return value


def save_rng(folder: Path, rank: int) -> None:
    """This rank's torch (CPU and CUDA), Python and NumPy random streams."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    atomic_write(folder / f"rng_rank{rank}.safetensors", lambda path: save_file(tensors, str(path)))
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    write_json_atomic(folder / f"rng_rank{rank}.json", {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
    })


def load_rng(folder: Path, rank: int) -> bool:
    """Restore this rank's RNG streams; False when the checkpoint has none for this rank."""
    path = folder / f"rng_rank{rank}.safetensors"
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    meta = read_json(folder / f"rng_rank{rank}.json")
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    return True
