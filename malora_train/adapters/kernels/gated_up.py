"""The gated up-projection ``y = out + s (gates * expand(z)) B^T``: the adapters' write of their full-size
output, added to the frozen layer's ``out`` in one GEMM.

``expand`` maps the rank space to the experts' inputs: ``u = z C^T`` (MALoRA, C stacking the P_t), ``z``
repeated for every expert (one shared down-projection, HydraLoRA) or ``z`` itself split into one block per
expert (MoLoRA); without gates it is plain LoRA's ``z``. The work on full-size tensors is two GEMMs whatever
the number of experts; on CUDA the rank-space side (expand and gate, and its backward) runs in one kernel
each instead of a chain of small torch ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malora_train.adapters.kernels.common import KERNEL_DTYPES, KernelState, pad

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none and run the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

if triton is not None:  # the routing kernel's softmax, top-K and statistics, for the kernels that route
    from malora_train.adapters.kernels.routing import (
        ROUTE_BLOCK_T,
        _row_weights,
        softmax_rows,
        store_stat_partials,
        top_k_gates,
    )


@dataclass(frozen=True)
class GatedUpSpec:
    """What a gated up-projection computes, besides its tensors."""

    scaling: float  # s
    num_experts: int  # N: the gates' columns, and the blocks of expand(z)
    shared: bool  # z feeds every expert (HydraLoRA), rather than z or u splitting into N blocks


def gated_up(z: torch.Tensor, out: torch.Tensor, up: torch.Tensor, scaling: float,
             gates: torch.Tensor | None = None, coeff: torch.Tensor | None = None, num_experts: int = 1,
             shared: bool = False, up_cast: torch.Tensor | None = None,
             coeff_cast: torch.Tensor | None = None, *, state: KernelState) -> torch.Tensor:
    """``out + scaling * (gates * u) up^T`` where ``u = z coeff^T`` (MALoRA), ``z`` for every expert
    (``shared``, HydraLoRA) or ``z`` itself split into ``num_experts`` blocks; no gates: plain LoRA.
    ``up_cast``/``coeff_cast``: those weights already in z's dtype (``working_copies``)."""
    spec = GatedUpSpec(scaling, num_experts, shared)
    return _GatedUp.apply(spec, state, z, out, up, gates, coeff, up_cast, coeff_cast)


class _GatedUp(torch.autograd.Function):
    """All tensors are in the compute dtype (z's) by construction: no autocast needed here. ``up_cast`` and
    ``coeff_cast``: ``up`` and ``coeff`` already cast, or None."""

    @staticmethod
    def forward(ctx, spec: GatedUpSpec, state: KernelState, z, out, up, gates, coeff, up_cast, coeff_cast):
        cdt = z.dtype
        coeff_c = _ready(coeff_cast, cdt, coeff)
        up_c = _ready(up_cast, cdt, up)
        use_kernel = gates is not None and _expand_kernels_run(state, z)
        if use_kernel:  # the kernels read every tensor as contiguous rows
            gates = gates.contiguous()
            coeff_c = coeff_c.contiguous() if coeff_c is not None else None

        def by_kernel():
            return expand_forward(z.contiguous(), coeff_c, gates, up.shape[1]), None, gates

        def by_torch():  # the torch ops gate in z's dtype
            gates_c = gates.to(cdt) if gates is not None else None
            u, gated = _expand_torch(z, gates_c, coeff_c, spec.num_experts, spec.shared)
            return gated, u, gates_c

        gated, u, gates_c = state.run(use_kernel, by_kernel, by_torch)
        y = _add_up(out, gated, up_c, spec.scaling)
        ctx.save_for_backward(z, u if coeff is not None else None, gated, up_c, gates_c, coeff_c)
        ctx.spec, ctx.state = spec, state
        ctx.expanded_by_kernel = u is None  # the kernel keeps no u: the backward runs its kernel too
        ctx.dtypes = (up.dtype, gates_c.dtype if gates_c is not None else None,
                      coeff.dtype if coeff is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, u, gated, up_c, gates_c, coeff_c = ctx.saved_tensors
        spec, s = ctx.spec, ctx.spec.scaling
        up_dtype, gates_dtype, coeff_dtype = ctx.dtypes
        _spec, _state, need_z, need_out, need_up, need_gates, need_coeff, _up_cast, _coeff_cast = (
            ctx.needs_input_grad)
        cdt = z.dtype
        gup = None
        grad_c = grad_y.to(cdt)
        if need_up:
            gup = weight_grad(grad_c.t(), gated, s, up_dtype, ctx.state)
        g_gated = _mm_scaled(grad_c, up_c, s)

        def by_torch():
            u_c, gates_z = u, gates_c
            if ctx.expanded_by_kernel:  # the forward's kernel kept neither u nor the gates in z's dtype
                u_c, _ = _expand_torch(z, None, coeff_c, spec.num_experts, spec.shared)
                gates_z = gates_c.to(cdt)
            return _expand_backward_torch(g_gated, z, u_c, gates_z, coeff_c, spec.num_experts, spec.shared,
                                          need_gates, need_z, need_coeff, gates_dtype)

        ggates, gz, gcoeff = ctx.state.run(
            ctx.expanded_by_kernel,
            lambda: expand_backward(g_gated, z.contiguous(), coeff_c, gates_c, need_gates, need_z,
                                    need_coeff),
            by_torch)
        ggates = ggates.to(gates_dtype) if ggates is not None else None
        gcoeff = gcoeff.to(coeff_dtype) if gcoeff is not None else None
        # one per input: spec, state, z, out, up, gates, coeff, up_cast, coeff_cast
        return None, None, gz, grad_y if need_out else None, gup, ggates, gcoeff, None, None


def routed_up(z: torch.Tensor, logits: torch.Tensor, out: torch.Tensor, up: torch.Tensor, scaling: float,
              top_k: int, renormalize: bool, coeff: torch.Tensor | None = None,
              up_cast: torch.Tensor | None = None, coeff_cast: torch.Tensor | None = None, *,
              state: KernelState) -> torch.Tensor | None:
    """Inference only (nothing for autograd): ``gated_up`` with the gates that ``routing.route`` gives the
    float32 ``logits``, computed inside the expand kernel, bit for bit: one launch for routing and gating
    instead of two, and no autograd Function around either. Decoding feeds a few tokens a step through every
    layer, so its time is these launches. None where the kernel does not run (the CPU, no Triton, another
    dtype, a failure): the caller then routes and gates as in training."""
    if not _expand_kernels_run(state, z):
        return None
    cdt = z.dtype
    coeff_c = _ready(coeff_cast, cdt, coeff)
    coeff_c = coeff_c.contiguous() if coeff_c is not None else None
    gated = state.run(True, lambda: routed_expand(z.contiguous(), coeff_c, logits.contiguous(), up.shape[1],
                                                  top_k, renormalize),
                      lambda: None)
    return _add_up(out, gated, _ready(up_cast, cdt, up), scaling) if gated is not None else None


def _expand_kernels_run(state: KernelState, z: torch.Tensor, family: str | None = None) -> bool:
    """The expand kernels need Triton, a CUDA ``z`` in a half-precision dtype, at least one row, and the
    kernels (of ``family``) allowed (``KernelState``)."""
    return (triton is not None and state.kernels_allowed(z, family) and z.dtype in KERNEL_DTYPES
            and z.shape[0] > 0)


def _add_up(out: torch.Tensor, gated: torch.Tensor, up_c: torch.Tensor, scaling: float) -> torch.Tensor:
    """``out + scaling * gated up_c^T``: one addmm when ``out`` is in the compute dtype."""
    if out.dtype == gated.dtype:
        return torch.addmm(out, gated, up_c.t(), alpha=scaling)
    return out + _mm_scaled(gated, up_c.t(), scaling).to(out.dtype)


def _ready(cast: torch.Tensor | None, dtype: torch.dtype, weight: torch.Tensor | None) -> torch.Tensor | None:
    """``weight`` in ``dtype``: its ready cast (``working_copies``) when there is one, else cast now."""
    if weight is None:
        return None
    return cast if cast is not None and cast.dtype == dtype else weight.to(dtype)


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` in one GEMM (alpha in the epilogue; beta = 0 never reads the empty input)."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scale)


# ``weight_grad``'s float32-output GEMM in ``KernelState``: where torch lacks it, the cast takes over
FLOAT32_OUTPUT = "float32-output GEMM"


def weight_grad(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype,
                state: KernelState) -> torch.Tensor:
    """``scale * a @ b`` in ``dtype`` (a weight's, float32): on CUDA a half-precision GEMM writes float32
    straight from its float32 accumulator (``out_dtype``: no rounding to half, and no cast kernel after),
    elsewhere, or where that operator fails, the GEMM's result is cast."""
    direct = (dtype == torch.float32 and a.dtype in KERNEL_DTYPES
              and state.kernels_allowed(a, FLOAT32_OUTPUT))
    return state.run(direct,
                     lambda: torch.addmm(a.new_empty(a.shape[0], b.shape[1], dtype=dtype), a, b, beta=0,
                                         alpha=scale, out_dtype=dtype),
                     lambda: _mm_scaled(a, b, scale).to(dtype), family=FLOAT32_OUTPUT)


# -- the torch path -----------------------------------------------------------------------------------------

def _expand_torch(z, gates_c, coeff_c, num_experts, shared):
    """(u, gated): u = z coeff^T (or z), gated = gates * u expanded per expert (``gates_c`` in z's dtype); the
    reference of ``expand_forward``."""
    T = z.shape[0]
    u = z @ coeff_c.t() if coeff_c is not None else z
    if gates_c is None:
        return u, u
    u3 = u.unsqueeze(1) if shared else u.view(T, num_experts, -1)
    return u, (u3 * gates_c.unsqueeze(-1)).reshape(T, -1)


def _expand_backward_torch(g_gated, z, u, gates_c, coeff_c, num_experts, shared, need_gates, need_z,
                           need_coeff, gates_dtype):
    """(dgates, dz, dcoeff) from dgated; the reference of ``expand_backward``."""
    T, cdt = z.shape[0], z.dtype
    ggates = gz = gcoeff = None
    if gates_c is None:
        g_u = g_gated
    else:
        u = u if coeff_c is not None else z
        g3 = g_gated.view(T, num_experts, -1)
        u3 = u.unsqueeze(1) if shared else u.view(T, num_experts, -1)
        if need_gates:
            ggates = (g3 * u3).sum(-1, dtype=torch.promote_types(cdt, gates_dtype))
        g3 = g3 * gates_c.unsqueeze(-1)
        g_u = g3.sum(1) if shared else g3.reshape(T, -1)
    if coeff_c is not None:
        if need_coeff:
            gcoeff = g_u.t() @ z
        gz = g_u @ coeff_c if need_z else None
    else:
        gz = g_u
    return ggates, gz, gcoeff


# -- the Triton kernels and their launchers (CUDA with Triton only) ------------------------------------------

# tokens per program of both kernels; each program holds its rows' whole expanded width (NR_PAD columns)
EXPAND_BLOCK_M = 32
NUM_WARPS = 4  # warps per program (Triton's default)


if triton is not None:

    @triton.jit
    def _expanded(z_ptr, c_ptr, rows, row_ok, cols, col_ok, RZ: tl.constexpr, RZ_PAD: tl.constexpr,
                  HAS_COEFF: tl.constexpr, CDT: tl.constexpr):
        """u (BLOCK_M, NR_PAD) float32: z C^T (MALoRA's P_t stacked in C), else column c of u is z's c mod RZ
        (MoLoRA: u = z; a down-projection shared by every expert: z repeated once per expert)."""
        if HAS_COEFF:
            kk = tl.arange(0, RZ_PAD)
            z = tl.load(z_ptr + rows[:, None] * RZ + kk[None, :], mask=row_ok[:, None] & (kk < RZ)[None, :],
                        other=0.0)
            ct = tl.load(c_ptr + cols[None, :] * RZ + kk[:, None], mask=col_ok[None, :] & (kk < RZ)[:, None],
                         other=0.0)
            return tl.dot(z.to(CDT), ct.to(CDT))
        return tl.load(z_ptr + rows[:, None] * RZ + (cols % RZ)[None, :],
                       mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)

    @triton.jit
    def _expand_fwd_kernel(
        z_ptr, c_ptr, g_ptr, out_ptr, T,
        RZ: tl.constexpr, RE: tl.constexpr, N: tl.constexpr, NR: tl.constexpr, RZ_PAD: tl.constexpr,
        NR_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_COEFF: tl.constexpr, CDT: tl.constexpr,
    ):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, NR_PAD)
        row_ok = rows < T
        col_ok = cols < NR
        ok = row_ok[:, None] & col_ok[None, :]
        u = _expanded(z_ptr, c_ptr, rows, row_ok, cols, col_ok, RZ, RZ_PAD, HAS_COEFF, CDT)
        gates = tl.load(g_ptr + rows[:, None] * N + (cols // RE)[None, :], mask=ok, other=0.0)
        tl.store(out_ptr + rows[:, None] * NR + cols[None, :], (u * gates).to(CDT), mask=ok)

    @triton.jit
    def _expand_bwd_kernel(
        gg_ptr, z_ptr, c_ptr, g_ptr, ggates_ptr, gz_ptr, part_ptr, T,
        RZ: tl.constexpr, RE: tl.constexpr, N: tl.constexpr, NR: tl.constexpr, RZ_PAD: tl.constexpr,
        NR_PAD: tl.constexpr, BLOCK_M: tl.constexpr, HAS_COEFF: tl.constexpr, NEED_GATES: tl.constexpr,
        NEED_Z: tl.constexpr, NEED_COEFF: tl.constexpr, CDT: tl.constexpr,
    ):
        """From dgated: dgates (float32), dz and this block's share of dC (float32 partials, summed after)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, NR_PAD)
        row_ok = rows < T
        col_ok = cols < NR
        ok = row_ok[:, None] & col_ok[None, :]
        gg = tl.load(gg_ptr + rows[:, None] * NR + cols[None, :], mask=ok, other=0.0).to(tl.float32)
        gates = tl.load(g_ptr + rows[:, None] * N + (cols // RE)[None, :], mask=ok, other=0.0)
        if NEED_GATES:
            prod = gg * _expanded(z_ptr, c_ptr, rows, row_ok, cols, col_ok, RZ, RZ_PAD, HAS_COEFF, CDT)
            expert = cols // RE
            for e in tl.static_range(N):
                tl.store(ggates_ptr + rows * N + e,
                         tl.sum(tl.where((expert == e)[None, :], prod, 0.0), axis=1), mask=row_ok)
        _expand_input_grads(gg * gates, z_ptr, c_ptr, gz_ptr, part_ptr, pid, rows, row_ok, cols, col_ok, RZ,
                            NR, RZ_PAD, NR_PAD, HAS_COEFF, NEED_Z, NEED_COEFF, CDT)

    @triton.jit
    def _expand_input_grads(gu, z_ptr, c_ptr, gz_ptr, part_ptr, pid, rows, row_ok, cols, col_ok,
                            RZ: tl.constexpr, NR: tl.constexpr, RZ_PAD: tl.constexpr, NR_PAD: tl.constexpr,
                            HAS_COEFF: tl.constexpr, NEED_Z: tl.constexpr, NEED_COEFF: tl.constexpr,
                            CDT: tl.constexpr):
        """From du (``gu``, float32, zero past NR): dz, and this block's share of dC (float32 partials)."""
        kk = tl.arange(0, RZ_PAD)
        z_ok = row_ok[:, None] & (kk < RZ)[None, :]
        if HAS_COEFF:
            gu_c = gu.to(CDT)
            if NEED_Z:
                c = tl.load(c_ptr + cols[:, None] * RZ + kk[None, :],
                            mask=col_ok[:, None] & (kk < RZ)[None, :], other=0.0)
                gz = tl.dot(gu_c, c.to(CDT))
                tl.store(gz_ptr + rows[:, None] * RZ + kk[None, :], gz.to(CDT), mask=z_ok)
            if NEED_COEFF:
                z = tl.load(z_ptr + rows[:, None] * RZ + kk[None, :], mask=z_ok, other=0.0)
                part = tl.dot(tl.trans(gu_c), z.to(CDT))
                tl.store(part_ptr + pid * NR_PAD * RZ_PAD + cols[:, None] * RZ_PAD + kk[None, :], part)
        elif NEED_Z:
            if RZ == NR:
                tl.store(gz_ptr + rows[:, None] * RZ + cols[None, :], gu.to(CDT),
                         mask=row_ok[:, None] & col_ok[None, :])
            else:  # z feeds every expert: dz sums the experts' du
                fold = ((cols[:, None] % RZ) == kk[None, :]) & col_ok[:, None]
                gz = tl.dot(gu, fold.to(tl.float32), input_precision="ieee")
                tl.store(gz_ptr + rows[:, None] * RZ + kk[None, :], gz.to(CDT), mask=z_ok)

    @triton.jit
    def _column_gates(gates, experts, cols, RE: tl.constexpr, N: tl.constexpr, BLOCK_M: tl.constexpr,
                      NR_PAD: tl.constexpr):
        """(BLOCK_M, NR_PAD): column c holds its expert's gate, ``gates[:, c // RE]`` exactly."""
        column_gates = tl.zeros((BLOCK_M, NR_PAD), tl.float32)
        for e in tl.static_range(N):
            gate = tl.sum(tl.where(experts[None, :] == e, gates, 0.0), axis=1)  # exactly gates[:, e]
            column_gates = tl.where((cols // RE)[None, :] == e, gate[:, None], column_gates)
        return column_gates

    @triton.jit
    def routed_block(logit_ptr, T, N: tl.constexpr, NR: tl.constexpr, NR_PAD: tl.constexpr,
                     N_PAD: tl.constexpr, BLOCK_M: tl.constexpr):
        """A routed kernel's block: (pid, its rows, the expanded columns, the experts, which rows and columns
        are real, and the rows' softmax probabilities and logsumexp)."""
        pid = tl.program_id(0)
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, NR_PAD)
        experts = tl.arange(0, N_PAD)
        probs, lse = softmax_rows(logit_ptr, rows, experts, T, N)
        return pid, rows, cols, experts, rows < T, cols < NR, probs, lse

    @triton.jit
    def _routed_expand_kernel(
        z_ptr, c_ptr, logit_ptr, out_ptr, idx_ptr, mask_ptr, part_ptr, T,
        RZ: tl.constexpr, RE: tl.constexpr, N: tl.constexpr, NR: tl.constexpr, RZ_PAD: tl.constexpr,
        NR_PAD: tl.constexpr, N_PAD: tl.constexpr, K: tl.constexpr, RENORM: tl.constexpr,
        DENSE: tl.constexpr, BLOCK_M: tl.constexpr, HAS_COEFF: tl.constexpr, CDT: tl.constexpr,
        STORE_IDX: tl.constexpr, COLLECT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):
        """``_expand_fwd_kernel`` with its gates routed here from float32 logits (T, N), by the routing
        kernel's own softmax and top-K: each column c takes expert c // RE's gate. For training it also keeps
        the chosen experts (``STORE_IDX``) and this block's share of the auxiliary statistics (``COLLECT``),
        as ``_route_fwd_kernel`` does: the gates themselves are not stored (the backward recomputes them)."""
        block = routed_block(logit_ptr, T, N, NR, NR_PAD, N_PAD, BLOCK_M)
        pid, rows, cols, experts, row_ok, col_ok, probs, lse = block
        gates, selected = top_k_gates(probs, rows, experts, idx_ptr, T, N, N_PAD, K, BLOCK_M, RENORM, DENSE,
                                      STORE_IDX=STORE_IDX)
        if COLLECT:
            weights = _row_weights(mask_ptr, rows, T, HAS_MASK)
            store_stat_partials(part_ptr, pid, probs, lse, selected, weights, experts, N_PAD)
        column_gates = _column_gates(gates, experts, cols, RE, N, BLOCK_M, NR_PAD)
        u = _expanded(z_ptr, c_ptr, rows, row_ok, cols, col_ok, RZ, RZ_PAD, HAS_COEFF, CDT)
        ok = row_ok[:, None] & col_ok[None, :]
        tl.store(out_ptr + rows[:, None] * NR + cols[None, :], (u * column_gates).to(CDT), mask=ok)

    # -- launchers: every tensor argument must be contiguous

    def _expand_shape(z: torch.Tensor, gates: torch.Tensor, width: int) -> dict:
        N = gates.shape[1]
        return dict(RZ=z.shape[1], RE=width // N, N=N, NR=width, RZ_PAD=pad(z.shape[1]), NR_PAD=pad(width),
                    BLOCK_M=EXPAND_BLOCK_M, CDT=getattr(tl, KERNEL_DTYPES[z.dtype]))

    def expand_forward(z: torch.Tensor, coeff: torch.Tensor | None, gates: torch.Tensor,
                       width: int) -> torch.Tensor:
        """gated (T, width) in z's dtype: column c is u[:, c] * gates[:, c // (width / N)], u = z coeff^T with
        ``coeff`` (width, RZ), else z's column c mod RZ (``gates`` (T, N) float32)."""
        T = z.shape[0]
        out = torch.empty(T, width, device=z.device, dtype=z.dtype)
        _expand_fwd_kernel[(triton.cdiv(T, EXPAND_BLOCK_M),)](
            z, coeff, gates, out, T, HAS_COEFF=coeff is not None, num_warps=NUM_WARPS,
            **_expand_shape(z, gates, width))
        return out

    def routed_expand(z: torch.Tensor, coeff: torch.Tensor | None, logits: torch.Tensor, width: int,
                      top_k: int, renormalize: bool) -> torch.Tensor:
        """``expand_forward`` with the gates of ``routing.route_forward(logits, top_k, renormalize)``."""
        return routed_expand_kernel(z, coeff, logits, width, top_k, renormalize)[0]

    def routed_expand_kernel(z: torch.Tensor, coeff: torch.Tensor | None, logits: torch.Tensor, width: int,
                             top_k: int, renormalize: bool, keep_idx: bool = False,
                             mask: torch.Tensor | None = None, collect: bool = False):
        """(gated, top_idx (T, K) int64 or None, the statistics' per-block partials or None):
        ``routed_expand`` that also keeps the chosen experts (``keep_idx``) and, when ``collect``, what
        ``_route_stats_kernel`` sums into the auxiliary losses (``mask``: the real tokens)."""
        T, N = logits.shape
        dense = top_k >= N
        K = N if dense else top_k
        n_pad = pad(N, least=2)
        blocks = triton.cdiv(T, ROUTE_BLOCK_T)
        out = torch.empty(T, width, device=z.device, dtype=z.dtype)
        top_idx = torch.empty(T, K, device=z.device, dtype=torch.int64) if keep_idx else None
        part = torch.empty(blocks, 2 * n_pad + 3, device=z.device, dtype=torch.float32) if collect else None
        # the routing kernel's block of tokens, so that its softmax sums in the same order (bit for bit)
        shape = {**_expand_shape(z, logits, width), "BLOCK_M": ROUTE_BLOCK_T}
        _routed_expand_kernel[(blocks,)](
            z, coeff, logits, out, top_idx, mask.view(torch.uint8) if mask is not None else None, part, T,
            N_PAD=n_pad, K=K, RENORM=renormalize, DENSE=dense, HAS_COEFF=coeff is not None,
            STORE_IDX=keep_idx, COLLECT=collect, HAS_MASK=mask is not None, num_warps=NUM_WARPS, **shape)
        return out, top_idx, part

    def expand_backward(grad_gated: torch.Tensor, z: torch.Tensor, coeff: torch.Tensor | None,
                        gates: torch.Tensor, need_gates: bool, need_z: bool, need_coeff: bool):
        """(dgates (T, N) float32, dz (T, RZ) z's dtype, dcoeff (width, RZ) float32), each None when not
        needed."""
        T, width = grad_gated.shape
        shape = _expand_shape(z, gates, width)
        blocks = triton.cdiv(T, EXPAND_BLOCK_M)
        need_coeff = need_coeff and coeff is not None
        ggates = torch.empty(T, shape["N"], device=z.device, dtype=torch.float32) if need_gates else None
        gz = torch.empty_like(z) if need_z else None
        part = (torch.empty(blocks, shape["NR_PAD"], shape["RZ_PAD"], device=z.device, dtype=torch.float32)
                if need_coeff else None)
        _expand_bwd_kernel[(blocks,)](
            grad_gated, z, coeff, gates, ggates, gz, part, T, HAS_COEFF=coeff is not None,
            NEED_GATES=need_gates, NEED_Z=need_z, NEED_COEFF=need_coeff, num_warps=NUM_WARPS, **shape)
        gcoeff = part.sum(0)[:width, :shape["RZ"]] if need_coeff else None
        return ggates, gz, gcoeff
