"""Shared machinery of the adapter layers: wrapping a frozen ``nn.Linear``, dropout, dtypes, and the
two ways to compute a mixture (the fast rank-space gated product and the per-expert reference loop).

The fast path (``impl=fast``) runs through the custom autograd Functions of ``kernels``: one pass over
the input computes ``z = D dropout(x)`` (D = ``down_projection()``) together with the router logits,
the routing and its auxiliary losses run fused, and ``gated_up`` adds ``s (g * expand(z)) B^T`` to the
frozen output in one addmm (in training on CUDA routing and gating are one Function, ``routed_gated_up``).
Only x (shared with the frozen layer) and a bit mask are kept for backward.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from malora_train.adapters.kernels.common import KernelState
from malora_train.adapters.kernels.gated_up import gated_up, routed_up
from malora_train.adapters.kernels.projection import project
from malora_train.adapters.kernels.routed_gated_up import RoutedUpSpec, routed_gated_up
from malora_train.adapters.kernels.routing import route
from malora_train.adapters.router import (
    Routing,
    assignment_counts,
    balance_loss,
    entropy,
    router_logits,
    top_k_route,
    z_loss,
)
from malora_train.adapters.shared_input import SharedInputGroup
from malora_train.config import AdapterConfig, MixtureConfig


class RoutingContext:
    """State the model wrapper shares with every mixture layer for one forward pass.

    ``token_mask`` marks real (non-padding) tokens so the auxiliary losses ignore padding;
    ``token_task`` (task index per token) turns on per-task routing counts for diagnostics.
    """

    def __init__(self) -> None:
        self.token_mask: torch.Tensor | None = None
        self.token_task: torch.Tensor | None = None
        self.num_tasks: int = 0
        self.collect: bool = False

    def mask_for(self, num_tokens: int) -> torch.Tensor | None:
        mask = self.token_mask
        return mask if mask is not None and mask.numel() == num_tokens else None

    def task_for(self, num_tokens: int) -> torch.Tensor | None:
        task = self.token_task
        return task if task is not None and task.numel() == num_tokens else None


def scaling_factor(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


class AdapterLinear(nn.Module):
    """A frozen linear layer ``y = W0 x`` plus a trainable low-rank delta.

    Adapter parameters are direct attributes of this module (never of a child) so that DeepSpeed
    ZeRO-3 gathers them in this module's forward hook. They are kept in float32; under autocast the
    matmuls run in the autocast dtype, otherwise the input is upcast to the adapter dtype.

    A layer is built from its kind's config (``malora_train.config``), already checked when it was made; the
    layer only reads it.
    """

    kind: ClassVar[str] = ""
    # parameter name -> tensor kind, for the parameter report
    tensor_kinds: ClassVar[dict[str, str]] = {}
    routed: ClassVar[bool] = False  # True: the layer takes the model's RoutingContext
    mergeable: ClassVar[bool] = False  # True: ``delta_weight`` folds the adapter into W0
    peft_format: ClassVar[bool] = False  # True: saved as a PEFT adapter (PeftModel loads it)

    def __init__(self, base: nn.Linear, cfg: AdapterConfig) -> None:
        super().__init__()
        self.base = base
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.expert_rank = cfg.effective_rank()
        self.alpha = cfg.effective_alpha()
        self.scaling = scaling_factor(self.alpha, self.expert_rank, cfg.use_rslora)
        self.dropout_p = cfg.dropout
        self.impl = cfg.impl
        # tells this layer's dropout mask from the others' under a device seed (inject sets it)
        self.dropout_salt = 0
        self.input_group: SharedInputGroup | None = None  # siblings reading the same input (inject sets it)
        self.casts: dict[str, torch.Tensor] | None = None  # this forward's cast weights (working_copies)
        self.kernel_state = KernelState()  # how the fast path runs: the model's, shared by its layers

    def param_factory(self, *shape: int) -> nn.Parameter:
        device = self.base.weight.device
        return nn.Parameter(torch.zeros(*shape, device=device, dtype=torch.float32))

    def dropout(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(x, self.dropout_p, self.training) if self.dropout_p > 0 else x

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """Flatten to (tokens, in_features); cast to the adapter's dtype (float32, or float64 in
        exactness tests) only when no autocast will cast the matmuls."""
        flat = x.reshape(-1, self.in_features)
        adapter_dtype = self.lora_B.dtype
        if not torch.is_autocast_enabled(x.device.type) and flat.dtype != adapter_dtype:
            flat = flat.to(adapter_dtype)
        return flat

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_state.compiled_as_kernels and torch.compiler.is_compiling():
            return forward_outside_graph(self, x)
        out = self.base(x)
        flat_out = out.reshape(-1, self.out_features)
        if self.impl == "reference":
            delta = self.reference_delta(self.adapter_input(x))
            result = flat_out + delta.to(flat_out.dtype)
        elif torch.compiler.is_compiling():
            # under torch.compile, plain differentiable ops let the compiler fuse them with the frozen layer
            result = self.composite_forward(self.adapter_input(x), flat_out)
        else:
            result = self.fast_forward(self.adapter_input(x), flat_out, x)
        return result.view(out.shape)

    def add_scaled(self, flat_out: torch.Tensor, u: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``flat_out + scaling * u @ up^T`` as one addmm (the add rides in the GEMM's epilogue)."""
        if torch.is_autocast_enabled(u.device.type) or flat_out.dtype == u.dtype:
            return torch.addmm(flat_out, u, up.t(), alpha=self.scaling)
        return flat_out + (self.scaling * (u @ up.t())).to(flat_out.dtype)

    def composite_forward(self, x: torch.Tensor, flat_out: torch.Tensor) -> torch.Tensor:
        """The fast path's maths in plain torch ops (no custom Functions): what torch.compile traces."""
        return self.add_scaled(flat_out, F.linear(self.dropout(x), self.lora_A), self.lora_B)

    def down_projection(self) -> torch.Tensor:
        """The matrix the fast path applies to ``dropout(x)``: ``lora_A`` (MALoRA: ``shared_A``)."""
        return self.lora_A

    def coeff_projection(self) -> torch.Tensor | None:
        """MALoRA's stacked P (N*R, d) between the shared projection and the up-projections."""
        return None

    def up_projection(self) -> torch.Tensor:
        return self.lora_B

    @property
    def partitioned(self) -> bool:
        """True while DeepSpeed ZeRO-3 holds the adapter tensors as partitions (gathered only inside this
        layer's own forward)."""
        return hasattr(self.lora_B, "ds_id")

    def cast(self, name: str) -> torch.Tensor | None:
        """This forward's ready cast of a weight (``working_copies.CAST_WEIGHTS``), or None: cast at use."""
        return self.casts.get(name) if self.casts else None

    def project_input(self, x: torch.Tensor, source: torch.Tensor | None, router: torch.Tensor | None):
        """``project`` of this layer's flattened input ``x``, through its shared-input group when it has one
        (``source``: the tensor the layer was called with, by which the group recognises its input)."""
        if self.input_group is not None and not self.partitioned:  # ZeRO-3: a sibling's weights are not here
            return self.input_group.project(self, x, x if source is None else source, router is not None)
        return project(x, self.down_projection(), router, self.dropout_p, self.training, self.dropout_salt,
                       down_cast=self.cast("down"), state=self.kernel_state)

    def fast_forward(self, x: torch.Tensor, flat_out: torch.Tensor,
                     source: torch.Tensor | None = None) -> torch.Tensor:
        z = self.project_input(x, source, None)
        return gated_up(z, flat_out, self.lora_B, self.scaling, up_cast=self.cast("up"),
                        state=self.kernel_state)

    def reference_delta(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_weight(self) -> torch.Tensor:
        """The dense (out, in) update for merging; only defined for adapters without a router."""
        raise TypeError(f"{self.kind} adapters route per token and cannot be merged into W0")

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, expert_rank={self.expert_rank}, "
                f"scaling={self.scaling:g}")


@torch.compiler.disable
def forward_outside_graph(layer: AdapterLinear, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s forward run eagerly from inside a compiled region (a graph break either side), so on its
    fast path: its Triton kernels and hand-written backwards, while the compiler fuses the frozen model's ops
    around it (``trainer.compile_adapters=kernels``, and ``auto`` for mixtures: on an H100 it made captured
    MALoRA 1.29x and MoLoRA 1.40x faster, where traced MALoRA gained nothing: BENCHMARKS.md). The frozen GEMM
    runs here too: the compiled pieces then pass plain tensors across the break, never a view of one of their
    own outputs. ``forward``, not a second call: the module's hooks have run."""
    return layer.forward(x)


class MixtureAdapterLinear(AdapterLinear):
    """A mixture of N low-rank experts behind a top-K router inside one linear layer.

    Subclasses describe the experts through three hooks: ``shared_features`` (what every expert
    reads, computed once per token), ``rank_space`` (all experts' rank-space activations at once,
    (T, N, R)) and ``expert_forward`` (one expert, for the reference loop). ``lora_B`` holds the
    experts' up-projections side by side, (out, N*R), so the fast path is two GEMMs whatever N is.
    The fast path reads the same structure from ``down_projection`` (what multiplies ``dropout(x)``),
    ``coeff_projection`` (MALoRA's P, between the two) and ``shared_down`` (HydraLoRA: one z for all).
    """

    shared_down: ClassVar[bool] = False
    routed = True

    def __init__(self, base: nn.Linear, cfg: MixtureConfig, context: RoutingContext | None = None) -> None:
        super().__init__(base, cfg)
        self.num_experts = cfg.num_experts
        self.top_k = cfg.active_experts()
        self.renormalize = cfg.router.renormalize
        self.jitter_noise = cfg.router.jitter_noise
        self.router_init_std = cfg.router.init_std
        self.router_init = cfg.router.init
        self.router_lr_scale = cfg.router.lr_scale  # read by train/optim.py: the router's param group
        self.context = context
        self.router = self.param_factory(self.num_experts, self.in_features)
        self.lora_B = self.param_factory(self.out_features, self.num_experts * self.expert_rank)
        self.aux: dict[str, torch.Tensor] = {}
        self.task_expert_counts: torch.Tensor | None = None

    def reset_router(self) -> None:
        """``adapter.router.init``: N(0, init_std), or kaiming: N(0, 1/in_features) (gain 1, fan in)."""
        if self.router_init == "kaiming":
            nn.init.kaiming_normal_(self.router, mode="fan_in", nonlinearity="linear")
        else:
            nn.init.normal_(self.router, std=self.router_init_std)
        nn.init.zeros_(self.lora_B)

    # -- routing ---------------------------------------------------------------------------------
    def route(self, x: torch.Tensor) -> Routing:
        logits = router_logits(x, self.router, self.jitter_noise, self.training)
        routing = top_k_route(logits, self.top_k, self.renormalize)
        mask = self.token_mask(x.shape[0])
        self.record_aux(routing, mask)
        self.count_tasks(routing.top_idx, routing.gates, mask)
        return routing

    def fast_route(self, logits: torch.Tensor) -> torch.Tensor:
        """Gates (T, N) from float32 logits, recording what ``route`` records; fused kernels on CUDA."""
        mask = self.token_mask(logits.shape[0])
        routed = route(logits, self.top_k, self.renormalize, mask, self.collecting(), state=self.kernel_state)
        if routed is not None:
            gates, top_idx, aux = routed
            if aux is not None:
                self.aux = aux
        else:
            routing = top_k_route(logits, self.top_k, self.renormalize)
            self.record_aux(routing, mask)
            gates, top_idx = routing.gates, routing.top_idx
        self.count_tasks(top_idx, gates, mask)
        return gates

    def token_mask(self, num_tokens: int) -> torch.Tensor | None:
        """The real (non-padding) tokens of this forward's auxiliary means, or None: all of them."""
        return self.context.mask_for(num_tokens) if self.context is not None else None

    def routing_unobserved(self, num_tokens: int) -> bool:
        """Nothing reads this forward's routing but its output: no gradient, no auxiliary losses collected,
        no routing counts per task (inference: evaluation, generation)."""
        return not (torch.is_grad_enabled() or self.collecting()
                    or (self.context is not None and self.context.task_for(num_tokens) is not None))

    def collecting(self) -> bool:
        return self.context is not None and self.context.collect

    def record_aux(self, routing: Routing, mask: torch.Tensor | None) -> None:
        """Keep this forward's auxiliary losses (with grad) and router entropy (detached).

        With grad on they are computed even when not collected: activation checkpointing recomputes
        the forward with collection off and needs the same autograd graph (the same saved tensors).
        """
        if not (self.collecting() or (self.context is not None and torch.is_grad_enabled())):
            return
        aux = {
            "balance": balance_loss(routing, mask),
            "z": z_loss(routing, mask),
            "entropy": entropy(routing, mask).detach(),
        }
        if self.collecting():
            self.aux = aux

    def count_tasks(self, top_idx: torch.Tensor, gates: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Accumulate (num_tasks, N) routing counts for diagnostics, when asked: token-slot assignments
        under top-K; under dense routing (K = N, every token reaches every expert) the gate mass instead."""
        task = self.context.task_for(top_idx.shape[0]) if self.context is not None else None
        if task is None:
            return
        if self.top_k == self.num_experts:
            counts = gates.detach().float()
        else:
            counts = assignment_counts(top_idx.detach(), self.num_experts)
        if mask is not None:
            counts = counts * mask.unsqueeze(-1).float()
        num_tasks = self.context.num_tasks
        if self.task_expert_counts is None or self.task_expert_counts.shape[0] != num_tasks:
            self.task_expert_counts = counts.new_zeros(num_tasks, self.num_experts)
        self.task_expert_counts.index_add_(0, task, counts)

    # -- the two computations ----------------------------------------------------------------------
    def shared_features(self, xd: torch.Tensor) -> torch.Tensor:
        return xd

    def rank_space(self, xd: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expert_forward(self, expert: int, h: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expert_up(self, expert: int) -> torch.Tensor:
        return self.lora_B[:, expert * self.expert_rank:(expert + 1) * self.expert_rank]

    def fast_forward(self, x: torch.Tensor, flat_out: torch.Tensor,
                     source: torch.Tensor | None = None) -> torch.Tensor:
        # multiplicative jitter changes the router's input, so the logits cannot share the pass over x
        fused_router = not (self.training and self.jitter_noise > 0)
        projected = self.project_input(x, source, self.router if fused_router else None)
        if fused_router:
            z, logits = projected
        else:
            z, logits = projected, router_logits(x, self.router, self.jitter_noise, self.training)
        if self.routing_unobserved(x.shape[0]):
            y = routed_up(z, logits, flat_out, self.lora_B, self.scaling, self.top_k, self.renormalize,
                          coeff=self.coeff_projection(), up_cast=self.cast("up"),
                          coeff_cast=self.cast("coeff"), state=self.kernel_state)
            if y is not None:
                return y
        elif self.context is None or self.context.task_for(x.shape[0]) is None:
            routed = self.route_and_gate_up(z, logits, flat_out)
            if routed is not None:
                return routed
        gates = self.fast_route(logits)
        return gated_up(z, flat_out, self.lora_B, self.scaling, gates=gates, coeff=self.coeff_projection(),
                        num_experts=self.num_experts, shared=self.shared_down, up_cast=self.cast("up"),
                        coeff_cast=self.cast("coeff"), state=self.kernel_state)

    def route_and_gate_up(self, z: torch.Tensor, logits: torch.Tensor,
                          flat_out: torch.Tensor) -> torch.Tensor | None:
        """Training's routing and gated up-projection in one Function on CUDA (``routed_gated_up``), recording
        the auxiliary losses as ``fast_route`` does; None where it does not run (then ``fast_route`` and
        ``gated_up`` do it in two steps)."""
        mask = self.token_mask(logits.shape[0])
        spec = RoutedUpSpec(self.scaling, self.num_experts, self.shared_down, self.top_k, self.renormalize,
                            self.collecting())
        routed = routed_gated_up(z, logits, mask, flat_out, self.lora_B, spec, coeff=self.coeff_projection(),
                                 up_cast=self.cast("up"), coeff_cast=self.cast("coeff"),
                                 state=self.kernel_state)
        if routed is None:
            return None
        y, aux = routed
        if aux is not None:
            self.aux = aux
        return y

    def composite_forward(self, x: torch.Tensor, flat_out: torch.Tensor) -> torch.Tensor:
        routing = self.route(x)
        u = self.rank_space(self.dropout(x))  # (T, N, R)
        gated = (u * routing.gates.to(u.dtype).unsqueeze(-1)).reshape(x.shape[0], -1)
        return self.add_scaled(flat_out, gated, self.lora_B)

    def reference_delta(self, x: torch.Tensor) -> torch.Tensor:
        """The conventional MoE computation: for each expert, gather its tokens, run it, scatter back."""
        routing = self.route(x)
        h = self.shared_features(self.dropout(x))
        delta = x.new_zeros(x.shape[0], self.out_features)
        for expert in range(self.num_experts):
            rows = (routing.top_idx == expert).nonzero(as_tuple=True)[0]
            gate = routing.gates[rows, expert].unsqueeze(-1)
            y = F.linear(self.expert_forward(expert, h[rows]), self.expert_up(expert))
            delta.index_add_(0, rows, (self.scaling * gate * y).to(delta.dtype))
        return delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, experts={self.num_experts}, top_k={self.top_k}"
