"""Adapted layers that read the same input run their input-side work as one.

q/k/v of an attention block read the same normalised hidden states, and so do gate/up of a gated MLP.
Their adapters' down-projections (``D dropout(x)``: LoRA's A, MoLoRA's stacked A_t, MALoRA's S_A) and their
routers' logits are then computed by one launch of the projection kernel (one GEMM each on the torch path
without dropout) and split. Each member keeps its own dropout mask (its own salt), router, gates, auxiliary
losses and up-projection: the maths of every layer is unchanged.

The group computes every member's projection when the first of them is called and hands each sibling its
own when that sibling is called with the same tensor (checked by identity, so a model that feeds siblings
different inputs simply computes each alone).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn

from malora_train.adapters.kernels import projection

# names of sibling linear layers (in one parent module) that read the same input, in the models' own order
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class SharedInputGroup:
    """Sibling adapted layers that read one input; see the module docstring."""

    def __init__(self, members: list[nn.Module]) -> None:
        self.members = members
        self._source: weakref.ref | None = None
        self._pending: dict[int, object] = {}
        self.casts: dict[str, torch.Tensor | None] | None = None  # stacked working copies (working_copies)

    def project(self, member: nn.Module, x: torch.Tensor, source: torch.Tensor, with_router: bool):
        """``member``'s ``projection.project(x, ...)``: z, or (z, logits) when ``with_router``. ``x`` is the
        member's flattened input, ``source`` the tensor it was called with (the same object for every
        sibling)."""
        key = id(member)
        if self._source is not None and self._source() is source and key in self._pending:
            result = self._pending.pop(key)
            if not self._pending:
                self._source = None
            return result
        first = self.members[0]
        routers = [m.router for m in self.members] if with_router else None
        casts = self.casts or {}
        results = projection.project_group(x, [m.down_projection() for m in self.members], routers,
                                           first.dropout_p, first.training, first.dropout_salt,
                                           down_cast=casts.get("down"),
                                           router_stack=casts.get("router") if with_router else None,
                                           state=first.kernel_state)
        self._pending = {id(m): r for m, r in zip(self.members, results) if m is not member}
        self._source = weakref.ref(source) if self._pending else None
        return results[self.members.index(member)]


def _compatible(layers: list[nn.Module]) -> bool:
    """Layers whose projections stack: one kind, the fast path, one dropout, equal D and router shapes."""
    first = layers[0]

    def signature(layer: nn.Module) -> tuple:
        router = getattr(layer, "router", None)
        return (type(layer), layer.impl, layer.dropout_p, tuple(layer.down_projection().shape),
                tuple(router.shape) if router is not None else None, getattr(layer, "jitter_noise", 0.0))

    return first.impl == "fast" and all(signature(layer) == signature(first) for layer in layers)


def group_shared_inputs(adapted: Iterable[tuple[str, nn.Module]]) -> list[SharedInputGroup]:
    """Form the groups among ``adapted`` (name, layer) pairs and attach each layer's group."""
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for name, layer in adapted:
        parent, _, child = name.rpartition(".")
        by_parent.setdefault(parent, {})[child] = layer
    groups = []
    for children in by_parent.values():
        for names in SIBLING_NAMES:
            members = [children[n] for n in names if n in children]
            if len(members) > 1 and _compatible(members):
                group = SharedInputGroup(members)
                for member in members:
                    member.input_group = group
                groups.append(group)
    return groups
