"""A mixture layer's routing and gated up-projection in one autograd Function, for training on CUDA.

``routing.route`` then ``gated_up.gated_up`` cost two Functions and five kernels a layer (route, statistics,
expand forward; expand backward, route backward). Every one of those steps is local to a token but the
statistics' sum, so here the forward routes inside the expand kernel (``gated_up._routed_expand_kernel``,
which keeps the chosen experts and the statistics' per-block partials) and the backward turns dgated straight
into dlogits in one kernel that recomputes the gates from the logits. One Function and three kernels a layer
(two without auxiliary losses): the eager step is host-bound, and its time is that count.

The results are the two-step path's: the gates bit for bit, the gradients up to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malora_train.adapters.kernels.common import KernelState, pad
from malora_train.adapters.kernels.gated_up import (
    EXPAND_BLOCK_M,
    NUM_WARPS,
    _add_up,
    _expand_backward_torch,
    _expand_kernels_run,
    _expand_torch,
    _mm_scaled,
    _ready,
    weight_grad,
)
from malora_train.adapters.kernels.routing import RouteSpec, _route_backward_autograd, aux_grads
from malora_train.adapters.router import top_k_route

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none and take the two-step path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

if triton is not None:
    from malora_train.adapters.kernels.gated_up import (
        _column_gates,
        _expand_input_grads,
        _expand_shape,
        _expanded,
        routed_block,
        routed_expand_kernel,
    )
    from malora_train.adapters.kernels.routing import (
        logits_grad,
        route_statistics,
        selected_experts,
    )


# the kernels' family in ``KernelState``: a failure of one turns these off and leaves the two-step kernels on
FAMILY = "routed gated up-projection"


@dataclass(frozen=True)
class RoutedUpSpec:
    """What a routed gated up-projection computes, besides its tensors."""

    scaling: float  # s
    num_experts: int  # N
    shared: bool  # z feeds every expert (HydraLoRA)
    top_k: int
    renormalize: bool
    collect: bool  # the auxiliary losses too


def routed_gated_up(z: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor | None, out: torch.Tensor,
                    up: torch.Tensor, spec: RoutedUpSpec, coeff: torch.Tensor | None = None,
                    up_cast: torch.Tensor | None = None, coeff_cast: torch.Tensor | None = None, *,
                    state: KernelState):
    """``out + s (gates * expand(z)) up^T`` with the gates that ``routing.route`` gives the float32 ``logits``
    (``mask``: the real tokens of the auxiliary means), differentiable in z, logits, out, up and coeff.
    Returns (y, aux): aux is {balance, z, entropy} when ``spec.collect``, else None. None where the kernels do
    not run (the CPU, no Triton, another dtype, a failure): the caller then routes and gates in two steps."""
    if not _expand_kernels_run(state, z, FAMILY):
        return None
    outputs = state.run(True, lambda: _RoutedGatedUp.apply(spec, state, z, logits.contiguous(), mask, out, up,
                                                           coeff, up_cast, coeff_cast),
                        lambda: None, family=FAMILY)
    if outputs is None:
        return None
    if not spec.collect:
        return outputs, None
    y, balance, z_loss, entropy = outputs
    return y, {"balance": balance, "z": z_loss, "entropy": entropy}


class _RoutedGatedUp(torch.autograd.Function):
    """Inputs: the spec, the state, z, float32 logits (T, N), the padding mask or None, the frozen output, the
    up-projection, C (MALoRA) or None, and the ready casts of the two weights or None. Outputs: y and, when
    collecting, the balance and z losses and the entropy."""

    @staticmethod
    def forward(ctx, spec: RoutedUpSpec, state: KernelState, z, logits, mask, out, up, coeff, up_cast,
                coeff_cast):
        cdt = z.dtype
        coeff_c = _ready(coeff_cast, cdt, coeff)
        coeff_c = coeff_c.contiguous() if coeff_c is not None else None
        up_c = _ready(up_cast, cdt, up)
        z = z.contiguous()
        gated, top_idx, part = routed_expand_kernel(z, coeff_c, logits, up.shape[1], spec.top_k,
                                                    spec.renormalize, keep_idx=True, mask=mask,
                                                    collect=spec.collect)
        y = _add_up(out, gated, up_c, spec.scaling)
        # the same tensors whether or not collecting: activation checkpointing recomputes with collection off
        # and matches saved tensors by position, so the statistics ride on ctx (as in ``routing._Route``)
        ctx.save_for_backward(z, logits, top_idx, mask, gated, up_c, coeff_c)
        ctx.set_materialize_grads(False)  # an auxiliary loss no loss reads gets None, not a filled zero
        ctx.spec, ctx.state = spec, state
        ctx.dtypes = (up.dtype, coeff.dtype if coeff is not None else None)
        ctx.stats = None
        if not spec.collect:
            return y
        balance, z_loss, entropy, ctx.stats = route_statistics(part, logits.shape[1], top_idx.shape[1])
        ctx.mark_non_differentiable(entropy)
        return y, balance, z_loss, entropy

    @staticmethod
    def backward(ctx, grad_y, grad_balance=None, grad_z=None, _grad_entropy=None):
        z, logits, top_idx, mask, gated, up_c, coeff_c = ctx.saved_tensors
        spec, state = ctx.spec, ctx.state
        up_dtype, coeff_dtype = ctx.dtypes
        _spec, _state, need_z, need_logits, _mask, need_out, need_up, need_coeff, _up_cast, _coeff_cast = (
            ctx.needs_input_grad)
        need_coeff = need_coeff and coeff_c is not None
        if grad_y is None:
            grad_y = gated.new_zeros(gated.shape[0], up_c.shape[0])
        grad_c = grad_y.to(z.dtype)
        gup = weight_grad(grad_c.t(), gated, spec.scaling, up_dtype, state) if need_up else None
        g_gated = _mm_scaled(grad_c, up_c, spec.scaling)
        stats, grad_balance, grad_z = aux_grads(ctx.stats, grad_balance, grad_z, state, logits)
        glogits, gz, gcoeff = state.run(
            True,
            lambda: routed_expand_backward(g_gated, z, coeff_c, logits, top_idx, mask, stats, grad_balance,
                                           grad_z, spec, need_logits, need_z, need_coeff),
            lambda: _backward_torch(g_gated, z, coeff_c, logits, mask, stats, grad_balance, grad_z, spec,
                                    need_logits, need_z, need_coeff),
            family=FAMILY)
        gcoeff = gcoeff.to(coeff_dtype) if gcoeff is not None else None
        # one per input: spec, state, z, logits, mask, out, up, coeff, up_cast, coeff_cast
        return None, None, gz, glogits, None, grad_y if need_out else None, gup, gcoeff, None, None


def _backward_torch(g_gated, z, coeff_c, logits, mask, stats, grad_balance, grad_z, spec: RoutedUpSpec,
                    need_logits, need_z, need_coeff):
    """(dlogits, dz, dC) by torch ops: the kernel's stand-in where it fails."""
    gates = top_k_route(logits, spec.top_k, spec.renormalize).gates.to(z.dtype)
    u, _ = _expand_torch(z, None, coeff_c, spec.num_experts, spec.shared)
    ggates, gz, gcoeff = _expand_backward_torch(g_gated, z, u, gates, coeff_c, spec.num_experts, spec.shared,
                                                need_logits, need_z, need_coeff, torch.float32)
    glogits = None
    if need_logits:
        route_spec = RouteSpec(spec.top_k, spec.renormalize, spec.collect)
        glogits = _route_backward_autograd(logits, mask, route_spec, stats, ggates, grad_balance, grad_z)
    return glogits, gz, gcoeff


if triton is not None:

    @triton.jit
    def _routed_expand_bwd_kernel(
        gg_ptr, z_ptr, c_ptr, logit_ptr, idx_ptr, mask_ptr, stats_ptr, gbal_ptr, gzl_ptr, glogit_ptr, gz_ptr,
        part_ptr, T,
        RZ: tl.constexpr, RE: tl.constexpr, N: tl.constexpr, NR: tl.constexpr, RZ_PAD: tl.constexpr,
        NR_PAD: tl.constexpr, N_PAD: tl.constexpr, K: tl.constexpr, RENORM: tl.constexpr, DENSE: tl.constexpr,
        BLOCK_M: tl.constexpr, HAS_COEFF: tl.constexpr, NEED_LOGITS: tl.constexpr, NEED_Z: tl.constexpr,
        NEED_COEFF: tl.constexpr, HAS_AUX: tl.constexpr, HAS_MASK: tl.constexpr, CDT: tl.constexpr,
    ):
        """From dgated: dlogits (through dgates, the top-K and the softmax, plus the auxiliary losses'
        share), dz and this block's share of dC. The gates are recomputed from the logits and the kept
        experts, as the forward computed them."""
        block = routed_block(logit_ptr, T, N, NR, NR_PAD, N_PAD, BLOCK_M)
        pid, rows, cols, experts, row_ok, col_ok, probs, lse = block
        selected = selected_experts(idx_ptr, rows, experts, T, N, N_PAD, K, BLOCK_M, DENSE)
        if DENSE:
            gates = probs
        else:
            gates = tl.where(selected, probs, 0.0)
            if RENORM:
                gates = gates / tl.sum(gates, axis=1)[:, None]
            gates = tl.where(row_ok[:, None], gates, 0.0)  # rows past T choose nothing: 0 / 0 there
        gg = tl.load(gg_ptr + rows[:, None] * NR + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                     other=0.0).to(tl.float32)
        if NEED_LOGITS:
            prod = gg * _expanded(z_ptr, c_ptr, rows, row_ok, cols, col_ok, RZ, RZ_PAD, HAS_COEFF, CDT)
            ggates = tl.zeros((BLOCK_M, N_PAD), tl.float32)
            for e in tl.static_range(N):
                ge = tl.sum(tl.where(((cols // RE) == e)[None, :], prod, 0.0), axis=1)
                ggates = tl.where(experts[None, :] == e, ge[:, None], ggates)
            glogits = logits_grad(probs, lse, selected, ggates, rows, experts, mask_ptr, stats_ptr, gbal_ptr,
                                  gzl_ptr, T, N, RENORM, DENSE, HAS_AUX, HAS_MASK)
            tl.store(glogit_ptr + rows[:, None] * N + experts[None, :], glogits,
                     mask=row_ok[:, None] & (experts < N)[None, :])
        gu = gg * _column_gates(gates, experts, cols, RE, N, BLOCK_M, NR_PAD)
        _expand_input_grads(gu, z_ptr, c_ptr, gz_ptr, part_ptr, pid, rows, row_ok, cols, col_ok, RZ, NR,
                            RZ_PAD, NR_PAD, HAS_COEFF, NEED_Z, NEED_COEFF, CDT)

    def routed_expand_backward(grad_gated: torch.Tensor, z: torch.Tensor, coeff: torch.Tensor | None,
                               logits: torch.Tensor, top_idx: torch.Tensor, mask: torch.Tensor | None,
                               stats: torch.Tensor | None, grad_balance: torch.Tensor | None,
                               grad_z: torch.Tensor | None, spec: RoutedUpSpec, need_logits: bool,
                               need_z: bool, need_coeff: bool):
        """(dlogits (T, N) float32, dz (T, RZ) in z's dtype, dC (NR, RZ) float32), each None when not needed;
        ``stats`` None: no auxiliary loss reaches the logits. Every tensor contiguous."""
        T, width = grad_gated.shape
        N = logits.shape[1]
        shape = _expand_shape(z, logits, width)
        blocks = triton.cdiv(T, EXPAND_BLOCK_M)
        glogits = torch.empty(T, N, device=z.device, dtype=torch.float32) if need_logits else None
        gz = torch.empty_like(z) if need_z else None
        part = (torch.empty(blocks, shape["NR_PAD"], shape["RZ_PAD"], device=z.device, dtype=torch.float32)
                if need_coeff else None)
        has_aux = stats is not None
        _routed_expand_bwd_kernel[(blocks,)](
            grad_gated, z, coeff, logits, top_idx, mask.view(torch.uint8) if mask is not None else None,
            stats, grad_balance if has_aux else None, grad_z if has_aux else None, glogits, gz, part, T,
            N_PAD=pad(N, least=2), K=top_idx.shape[1], RENORM=spec.renormalize, DENSE=spec.top_k >= N,
            HAS_COEFF=coeff is not None, NEED_LOGITS=need_logits, NEED_Z=need_z, NEED_COEFF=need_coeff,
            HAS_AUX=has_aux, HAS_MASK=mask is not None, num_warps=NUM_WARPS, **shape)
        gcoeff = part.sum(0)[:width, :shape["RZ"]] if need_coeff else None
        return glogits, gz, gcoeff
