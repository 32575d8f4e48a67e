"""The frozen model's RMSNorms as one fused operator each way (``model.fused_norms``).

transformers' Llama-family RMSNorm is eight small operators in the forward and about fifteen more in
autograd's backward: a quarter of the kernel launches of an eager MALoRA step at SmolLM2-135M shapes
(``scripts/count_launches.py``), and the eager step is host-bound on its launches. ``F.rms_norm`` runs
``aten::_fused_rms_norm`` when input and weight share a dtype: one CUDA kernel forward and one backward
(the frozen weight's gradient is never computed). Elsewhere it decomposes into the same operators as
transformers' code. Inside ``torch.compile`` the module computes transformers' operators, which the compiler
fuses with their neighbours.

Only modules whose ``forward`` is transformers' Llama RMSNorm, source for source, are replaced (Llama,
Mistral, Mixtral, Qwen2/3 and their MoE variants, Phi-3, SmolLM2 ...); Gemma's ``1 + weight`` or OLMo-2's
order of operations keep their own. Numerics: identical in float32; in bfloat16 the fused kernel rounds
once where transformers rounds the normalised input and then its product with the weight (at most a unit
in the last place apart); float64, which transformers normalises in float32, keeps transformers' operators.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

rms_norm = F.rms_norm  # the operator itself (``scripts/count_launches.py`` counts it as the GPU's launches)
# the input dtypes whose fused result is transformers' (float64: transformers computes in float32)
FUSED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FusedRMSNorm(torch.nn.Module):
    """A drop-in for a transformers RMSNorm ``norm`` that keeps its ``weight`` Parameter (same state-dict key)
    and, where the fused operator would not give transformers' result, runs ``norm``'s own ``forward``."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self._transformers_forward = type(norm).forward

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # transformers' result takes the weight's dtype and is computed in float32 (float64 too); and under
        # torch.compile its small operators fuse with their neighbours (the residual add), where inductor runs
        # aten::_fused_rms_norm as an opaque kernel
        if (hidden_states.dtype != self.weight.dtype or hidden_states.dtype not in FUSED_DTYPES
                or torch.compiler.is_compiling()):
            return self._transformers_forward(self, hidden_states)
        # autocast lists rms_norm as a float32 operator: it would cast a bf16 input up and return float32,
        # where transformers' module returns the input's dtype
        with torch.autocast(hidden_states.device.type, enabled=False):
            return rms_norm(hidden_states, self.weight.shape, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


@functools.cache
def _llama_forward_source() -> str:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    return inspect.getsource(LlamaRMSNorm.forward)


@functools.cache
def _computes_llama_rms_norm(cls: type) -> bool:
    forward = getattr(cls, "forward", None)
    try:
        return forward is not None and inspect.getsource(forward) == _llama_forward_source()
    except (OSError, TypeError):  # source not on disk (a class made at run time)
        return False


def is_llama_rms_norm(module: torch.nn.Module) -> bool:
    """True for a module that computes transformers' Llama RMSNorm over its 1-D ``weight``."""
    weight = getattr(module, "weight", None)
    return (isinstance(weight, torch.nn.Parameter) and weight.dim() == 1
            and isinstance(getattr(module, "variance_epsilon", None), float)
            and _computes_llama_rms_norm(type(module)))


def fuse_rms_norms(model: torch.nn.Module) -> int:
    """Replace every Llama-family RMSNorm in ``model`` by a ``FusedRMSNorm``; returns how many."""
    targets = [(name, module) for name, module in model.named_modules() if is_llama_rms_norm(module)]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, FusedRMSNorm(module))
    return len(targets)
