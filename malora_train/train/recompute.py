"""Activation recomputation (``trainer.gradient_checkpointing``): each decoder layer keeps only its input
after the forward and computes its activations again in the backward.

``true`` recomputes the whole layer. With a frozen model the backward costs about one forward (no weight
gradients of the frozen matrices), so the recompute adds about half a step. ``selective`` recomputes the
layer too but keeps the outputs of the frozen projections named in ``trainer.checkpointing_keeps`` (by
default the ones that read the layer's normalised inputs: q, k, v of attention and gate, up of the MLP).
At LLaMA-7B those hold about 70% of a layer's forward FLOPs (3 x 4096^2 + 2 x 4096 x 11008 of
4 x 4096^2 + 3 x 4096 x 11008 a token) for 3 x 4096 + 2 x 11008 values a token and layer (9 GB for 4 x 1024
tokens through 32 layers in bf16); what is left to recompute is the output projections, attention and the
elementwise work.

The kept products are picked by module, not by shape: forward hooks on the frozen ``nn.Linear`` of each kept
projection mark its span, and the selective-checkpoint policy saves the matrix products that run inside it
(the adapter's own products run outside the frozen linear and are recomputed).
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from malora_train.errors import ConfigError

SETTINGS = (False, True, "selective")
MATRIX_PRODUCTS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                             torch.ops.aten.bmm.default})


def check_setting(setting: object, keeps: list[str]) -> None:
    if setting not in SETTINGS:
        raise ConfigError(f"trainer.gradient_checkpointing={setting!r} is not one of true, false, selective")
    if setting == "selective" and not keeps:
        raise ConfigError("trainer.gradient_checkpointing=selective needs trainer.checkpointing_keeps to "
                          "name at least one projection (e.g. [gate_proj, up_proj])")


def enable_activation_checkpointing(model: nn.Module, preserve_rng_state: bool = True,
                                    keeps: list[str] | None = None) -> None:
    """Recompute each decoder layer's activations in the backward, except, when ``keeps`` names projections
    (``selective``), their frozen outputs. ``preserve_rng_state=False``: the recompute leaves the RNG states
    alone (a captured step, whose dropout masks come from a device-side seed and which could not save and
    restore them)."""
    # the reentrant variant needs inputs that require grad, and takes no selective policy
    kwargs = {"use_reentrant": False, "preserve_rng_state": preserve_rng_state}
    if keeps:
        kwargs["context_fn"] = functools.partial(create_selective_checkpoint_contexts,
                                                 KeptProjections(model, keeps).policy)
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x; the old name warns
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def kept_linears(model: nn.Module, keeps: list[str]) -> list[tuple[str, nn.Linear]]:
    """The frozen linears whose outputs ``selective`` keeps: each projection named in ``keeps``, its own
    ``nn.Linear`` or the ``base`` of the adapter that wraps it."""
    found = []
    for name, module in model.named_modules():
        projection = name.removesuffix(".base").rpartition(".")[2]
        if isinstance(module, nn.Linear) and projection in keeps:
            found.append((name, module))
    return found


class KeptProjections:
    """The selective policy: save the matrix products run inside a kept frozen linear, recompute the rest."""

    def __init__(self, model: nn.Module, keeps: list[str]) -> None:
        linears = kept_linears(model, keeps)
        if not linears:
            raise ConfigError(f"trainer.checkpointing_keeps=[{', '.join(keeps)}]: this model has no linear "
                              "layer of those names to keep (trainer.gradient_checkpointing=selective)")
        self.inside = 0  # depth of kept linears' forwards now running
        for _, linear in linears:
            linear.register_forward_pre_hook(self._enter)
            linear.register_forward_hook(self._leave)

    def _enter(self, module: nn.Module, args: tuple) -> None:
        self.inside += 1

    def _leave(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.inside -= 1

    def policy(self, ctx, op, *args, **kwargs) -> CheckpointPolicy:
        if self.inside and op in MATRIX_PRODUCTS:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE
