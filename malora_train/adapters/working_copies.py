"""The adapters' float32 weights cast once per forward under autocast, in one multi-tensor copy.

Under autocast every adapted layer would cast its float32 down-projection, coefficient matrix and
up-projection to the autocast dtype at each use: three small kernels a layer, 540 a forward at SmolLM2's
180 adapted layers, a tenth of a captured step's kernels. ``WorkingCopies`` keeps one buffer per weight for
the model's lifetime and refreshes them all at the start of each forward with ``torch._foreach_copy_`` (a few
launches in all); the layers' custom Functions read the buffers instead of casting, and their gradients
still go to the float32 weights. A shared-input group's down-projections (cast) and routers (float32) sit
side by side in one buffer each, as the group's kernel reads them. Not used when the parameters are
DeepSpeed ZeRO-3 partitions (they are gathered only inside each layer's own forward).
"""

from __future__ import annotations

import torch
from torch import nn

# cast weight name -> the layer method that gives the float32 tensor
CAST_WEIGHTS = {"down": "down_projection", "coeff": "coeff_projection", "up": "up_projection"}


class WorkingCopies:
    """Cast buffers of every adapted layer's weights; see the module docstring."""

    def __init__(self, layers: list[nn.Module]) -> None:
        self.layers = layers
        self.dtype: torch.dtype | None = None  # the dtype of the buffers now in the layers, None: none
        self._copies: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []  # (targets, sources) per dtype

    @torch.no_grad()
    def refresh(self, dtype: torch.dtype) -> None:
        """Fill the buffers (made on first use, or for a new dtype or device) from the float32 weights."""
        if not self.layers or self.layers[0].partitioned:  # ZeRO-3 partitions: cast at use
            self.release()
            return
        device = self.layers[0].lora_B.device
        if self.dtype != dtype or self._copies[0][0][0].device != device:
            self._allocate(dtype)
        for targets, sources in self._copies:
            torch._foreach_copy_(targets, sources)

    def release(self) -> None:
        """Back to casting at each use (no buffers in the layers)."""
        if self.dtype is None:
            return
        for layer in self.layers:
            layer.casts = None
            if layer.input_group is not None:
                layer.input_group.casts = None
        self.dtype, self._copies = None, []

    def _allocate(self, dtype: torch.dtype) -> None:
        self.release()
        pairs: list[tuple[torch.Tensor, torch.Tensor]] = []

        def buffer_for(weights: list[torch.Tensor], buffer_dtype: torch.dtype) -> torch.Tensor:
            buffer = torch.empty(len(weights), *weights[0].shape, dtype=buffer_dtype,
                                 device=weights[0].device)
            pairs.extend((buffer[i], weight) for i, weight in enumerate(weights))
            return buffer

        for layer in self.layers:
            layer.casts = {}
        groups = {id(layer.input_group): layer.input_group for layer in self.layers
                  if layer.input_group is not None}
        for group in groups.values():
            down = buffer_for([m.down_projection() for m in group.members], dtype)
            routers = [m.router for m in group.members] if hasattr(group.members[0], "router") else None
            group.casts = {"down": down,
                           "router": buffer_for(routers, routers[0].dtype) if routers is not None else None}
            for i, member in enumerate(group.members):
                member.casts["down"] = down[i]
        for layer in self.layers:
            for name, method in CAST_WEIGHTS.items():
                weight = getattr(layer, method)()
                if name not in layer.casts and weight is not None:
                    layer.casts[name] = buffer_for([weight], dtype)[0]
        by_dtype: dict[torch.dtype, tuple[list, list]] = {}
        for target, source in pairs:  # the multi-tensor copy takes one destination dtype a call
            targets, sources = by_dtype.setdefault(target.dtype, ([], []))
            targets.append(target)
            sources.append(source)
        self._copies = list(by_dtype.values())
        self.dtype = dtype
