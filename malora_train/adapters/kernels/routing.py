"""Top-K routing in fused kernels: softmax, top-K and renormalisation of float32 router logits, with the
statistics of the auxiliary losses (balance, z-loss, entropy) from the same pass, forward and backward.

The kernels compute what ``router`` computes (``top_k_route``, ``balance_loss``, ``z_loss``, ``entropy``);
where they do not run (the CPU, no Triton, a failure) ``route`` answers None and the layer routes with those
torch functions instead.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from malora_train.adapters.kernels.common import KernelState, pad
from malora_train.adapters.router import balance_loss, top_k_route, z_loss

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none and route with ``router``
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None


@dataclass(frozen=True)
class RouteSpec:
    """What a routing computes, besides its tensors."""

    top_k: int  # experts per token (every expert when top_k >= N)
    renormalize: bool  # the top-K probabilities rescaled to sum to 1
    collect: bool  # the auxiliary-loss statistics too


def route(logits: torch.Tensor, top_k: int, renormalize: bool, mask: torch.Tensor | None, collect: bool, *,
          state: KernelState):
    """(gates (T, N), top_idx (T, K), aux) from float32 logits in fused kernels; ``aux`` is {balance, z,
    entropy} as ``router`` computes them when ``collect``, else None. None where the kernels do not
    run (the CPU, no Triton, a failure): the caller then routes with ``router.top_k_route``."""
    spec = RouteSpec(top_k, renormalize, collect)
    outputs = state.run(triton is not None and state.kernels_allowed(logits),
                        lambda: _Route.apply(spec, state, logits.contiguous(), mask), lambda: None)
    if outputs is None:
        return None
    if not collect:
        return outputs[0], outputs[1], None
    gates, top_idx, balance, z, entropy = outputs
    return gates, top_idx, {"balance": balance, "z": z, "entropy": entropy}


class _Route(torch.autograd.Function):
    """Inputs: the spec, the state, float32 logits (T, N) and the padding mask (or None). Outputs: the gates,
    top_idx and, when collecting, the balance and z losses and the entropy."""

    @staticmethod
    def forward(ctx, spec: RouteSpec, state: KernelState, logits, mask):
        gates, top_idx, aux = route_forward(logits, spec.top_k, spec.renormalize, mask, spec.collect)
        # Activation checkpointing recomputes with collect off and matches saved tensors by position,
        # so the tiny statistics ride on ctx instead of save_for_backward.
        ctx.save_for_backward(logits, top_idx, mask)
        # an output no loss reads (top_idx, the entropy, the z-loss at a zero coefficient) gets None for a
        # gradient, not a zero tensor: three fill kernels a layer and step fewer
        ctx.set_materialize_grads(False)
        ctx.stats = aux[3] if aux is not None else None
        ctx.spec, ctx.state = spec, state
        ctx.mark_non_differentiable(top_idx)
        if aux is None:
            return gates, top_idx
        balance, z, entropy, _ = aux
        ctx.mark_non_differentiable(entropy)
        return gates, top_idx, balance, z, entropy

    @staticmethod
    def backward(ctx, grad_gates, _grad_idx, grad_balance=None, grad_z=None, _grad_entropy=None):
        logits, top_idx, mask = ctx.saved_tensors
        grad_gates = grad_gates.contiguous() if grad_gates is not None else torch.zeros_like(logits)
        stats, grad_balance, grad_z = aux_grads(ctx.stats, grad_balance, grad_z, ctx.state, logits)
        glogits = ctx.state.run(
            True,
            lambda: route_backward(logits, top_idx, mask, grad_gates, stats, grad_balance, grad_z,
                                   ctx.spec.renormalize),
            lambda: _route_backward_autograd(logits, mask, ctx.spec, stats, grad_gates, grad_balance, grad_z))
        return None, None, glogits, None  # one per input: spec, state, logits, mask


def aux_grads(stats: torch.Tensor | None, grad_balance: torch.Tensor | None, grad_z: torch.Tensor | None,
              state: KernelState, like: torch.Tensor):
    """(stats, dbalance, dz_loss) as the backward kernels read them: stats None where no auxiliary loss was
    read (the gates' gradient alone), else both gradients, a loss left out of the total counting as zero."""
    if grad_balance is None and grad_z is None:
        return None, None, None
    if stats is None:
        return None, grad_balance, grad_z
    return (stats, grad_balance if grad_balance is not None else state.zero(like),
            grad_z if grad_z is not None else state.zero(like))


def _route_backward_autograd(logits, mask, spec: RouteSpec, stats, grad_gates, grad_balance,
                             grad_z) -> torch.Tensor:
    """The backward by autograd through ``router``'s torch functions (the kernel's stand-in)."""
    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        routing = top_k_route(leaf, spec.top_k, spec.renormalize)
        total = (routing.gates * grad_gates).sum()
        if stats is not None:
            total = total + grad_balance * balance_loss(routing, mask)
            total = total + grad_z * z_loss(routing, mask)
        return torch.autograd.grad(total, leaf)[0]


# -- the Triton kernels and their launchers (CUDA with Triton only) ------------------------------------------

ROUTE_BLOCK_T = 64  # tokens per program of the forward and backward kernels (each holds its rows' N experts)
STATS_BLOCK_P = 64  # per-program partial sums the statistics kernel (one program) adds per loop step
NUM_WARPS = 4  # warps per program (Triton's default)


if triton is not None:

    @triton.jit
    def softmax_rows(logit_ptr, rows, cols, T, N: tl.constexpr):
        """Row softmax of a (rows, cols) logit block: (probs, logsumexp); padded columns get probability 0."""
        row_ok = rows < T
        col_ok = cols < N
        logits = tl.load(logit_ptr + rows[:, None] * N + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=float("-inf"))
        logits = tl.where((rows >= T)[:, None] & col_ok[None, :], 0.0, logits)  # rows past T stay finite
        top = tl.max(logits, axis=1)
        e = tl.exp(logits - top[:, None])
        total = tl.sum(e, axis=1)
        return e / total[:, None], top + tl.log(total)

    @triton.jit
    def top_k_gates(probs, rows, cols, idx_ptr, T, N: tl.constexpr, N_PAD: tl.constexpr, K: tl.constexpr,
                     BLOCK_T: tl.constexpr, RENORM: tl.constexpr, DENSE: tl.constexpr,
                     STORE_IDX: tl.constexpr):
        """(gates, selected) of a (rows, cols) probability block: the K largest probabilities of each row
        (the first of equal ones), renormalised to sum to 1 with ``RENORM``, every expert when ``DENSE``;
        with ``STORE_IDX`` the chosen experts' indices go to ``idx_ptr`` (T, K) in the order chosen."""
        row_ok = rows < T
        col_ok = cols < N
        if DENSE:
            selected = (rows >= 0)[:, None] & col_ok[None, :]
            gates = probs
            if STORE_IDX:
                for k in tl.static_range(K):
                    tl.store(idx_ptr + rows * K + k, tl.zeros((BLOCK_T,), tl.int64) + k, mask=row_ok)
        else:
            remaining = tl.where(col_ok[None, :], probs, -1.0)
            chosen = tl.zeros((BLOCK_T, N_PAD), tl.int32)
            for k in tl.static_range(K):
                best = tl.argmax(remaining, axis=1)
                if STORE_IDX:
                    tl.store(idx_ptr + rows * K + k, best.to(tl.int64), mask=row_ok)
                hit = cols[None, :] == best[:, None]
                chosen = tl.where(hit, 1, chosen)
                remaining = tl.where(hit, -2.0, remaining)
            selected = chosen != 0
            top = tl.where(selected, probs, 0.0)
            if RENORM:
                gates = top / tl.sum(top, axis=1)[:, None]
            else:
                gates = top
        return gates, selected

    @triton.jit
    def _row_weights(mask_ptr, rows, T, HAS_MASK: tl.constexpr):
        """Per-token weight of the auxiliary means: the padding mask, 0 past T."""
        row_ok = rows < T
        if HAS_MASK:
            return tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.float32)
        return row_ok.to(tl.float32)

    @triton.jit
    def store_stat_partials(part_ptr, pid, probs, lse, selected, w, cols, N_PAD: tl.constexpr):
        """Program ``pid``'s share of the auxiliary statistics, weighted per token by ``w``: assignment
        counts and probability sums per expert, then sum lse^2, sum entropy, sum w (``_route_stats_kernel``
        adds them up)."""
        part = part_ptr + pid * (2 * N_PAD + 3)
        tl.store(part + cols, tl.sum(w[:, None] * selected.to(tl.float32), axis=0))
        tl.store(part + N_PAD + cols, tl.sum(w[:, None] * probs, axis=0))
        tl.store(part + 2 * N_PAD, tl.sum(w * lse * lse, axis=0))
        entropy = -tl.sum(probs * tl.log(tl.maximum(probs, 1e-20)), axis=1)
        tl.store(part + 2 * N_PAD + 1, tl.sum(w * entropy, axis=0))
        tl.store(part + 2 * N_PAD + 2, tl.sum(w, axis=0))

    @triton.jit
    def selected_experts(idx_ptr, rows, cols, T, N: tl.constexpr, N_PAD: tl.constexpr, K: tl.constexpr,
                         BLOCK_T: tl.constexpr, DENSE: tl.constexpr):
        """(BLOCK_T, N_PAD) flags of the experts each row was routed to, read back from top_idx (T, K)."""
        col_ok = cols < N
        if DENSE:
            return (rows >= 0)[:, None] & col_ok[None, :]
        chosen = tl.zeros((BLOCK_T, N_PAD), tl.int32)
        for k in tl.static_range(K):
            best = tl.load(idx_ptr + rows * K + k, mask=rows < T, other=-1)
            chosen = tl.where(cols[None, :] == best[:, None], 1, chosen)
        return chosen != 0

    @triton.jit
    def logits_grad(probs, lse, selected, gg, rows, cols, mask_ptr, stats_ptr, gbal_ptr, gz_ptr, T,
                    N: tl.constexpr, RENORM: tl.constexpr, DENSE: tl.constexpr, HAS_AUX: tl.constexpr,
                    HAS_MASK: tl.constexpr):
        """dlogits (BLOCK_T, N_PAD) from dgates ``gg`` and, with ``HAS_AUX``, the balance and z-loss
        gradients (scalars at ``gbal_ptr``, ``gz_ptr``; ``stats_ptr``: ``_route_stats_kernel``'s total and
        shares)."""
        col_ok = cols < N
        if RENORM and not DENSE:
            top = tl.where(selected, probs, 0.0)
            top_sum = tl.sum(top, axis=1)
            gates = top / top_sum[:, None]
            through = tl.sum(gg * gates, axis=1)
            gprobs = tl.where(selected, (gg - through[:, None]) / top_sum[:, None], 0.0)
        else:
            gprobs = tl.where(selected, gg, 0.0)
        if HAS_AUX:
            w = _row_weights(mask_ptr, rows, T, HAS_MASK)
            total = tl.load(stats_ptr)
            share = tl.load(stats_ptr + 1 + cols, mask=col_ok, other=0.0)
            gbal = tl.load(gbal_ptr)
            gprobs += gbal * N * share[None, :] * (w / total)[:, None]
        glogits = probs * (gprobs - tl.sum(probs * gprobs, axis=1)[:, None])
        if HAS_AUX:
            gz = tl.load(gz_ptr)
            glogits += (gz * 2.0 * lse * w / total)[:, None] * probs
        return glogits

    @triton.jit
    def _route_fwd_kernel(
        logit_ptr, mask_ptr, gates_ptr, idx_ptr, part_ptr,
        T, N: tl.constexpr,
        N_PAD: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, RENORM: tl.constexpr,
        DENSE: tl.constexpr,
        COLLECT: tl.constexpr, HAS_MASK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, N_PAD)
        row_ok = rows < T
        col_ok = cols < N
        probs, lse = softmax_rows(logit_ptr, rows, cols, T, N)
        gates, selected = top_k_gates(probs, rows, cols, idx_ptr, T, N, N_PAD, K, BLOCK_T, RENORM, DENSE,
                                       STORE_IDX=True)
        tl.store(gates_ptr + rows[:, None] * N + cols[None, :], gates, mask=row_ok[:, None] & col_ok[None, :])
        if COLLECT:
            weights = _row_weights(mask_ptr, rows, T, HAS_MASK)
            store_stat_partials(part_ptr, pid, probs, lse, selected, weights, cols, N_PAD)

    @triton.jit
    def _route_stats_kernel(
        part_ptr, balance_ptr, z_ptr, entropy_ptr, stats_ptr, P, N: tl.constexpr, K: tl.constexpr,
        N_PAD: tl.constexpr, BLOCK_P: tl.constexpr,
    ):
        """Sum the per-block partials; balance = N sum_i share_i mean_p_i, z and entropy are token means."""
        cols = tl.arange(0, N_PAD)
        width = 2 * N_PAD + 3
        counts = tl.zeros((BLOCK_P, N_PAD), tl.float32)
        prob_sums = tl.zeros((BLOCK_P, N_PAD), tl.float32)
        lse2 = tl.zeros((BLOCK_P,), tl.float32)
        ent = tl.zeros((BLOCK_P,), tl.float32)
        weight = tl.zeros((BLOCK_P,), tl.float32)
        for p0 in range(0, P, BLOCK_P):
            blocks = p0 + tl.arange(0, BLOCK_P)
            ok = blocks < P
            base = part_ptr + blocks * width
            counts += tl.load(base[:, None] + cols[None, :], mask=ok[:, None], other=0.0)
            prob_sums += tl.load(base[:, None] + N_PAD + cols[None, :], mask=ok[:, None], other=0.0)
            lse2 += tl.load(base + 2 * N_PAD, mask=ok, other=0.0)
            ent += tl.load(base + 2 * N_PAD + 1, mask=ok, other=0.0)
            weight += tl.load(base + 2 * N_PAD + 2, mask=ok, other=0.0)
        total = tl.maximum(tl.sum(weight, axis=0), 1.0)
        share = tl.sum(counts, axis=0) / total / K
        mean_prob = tl.sum(prob_sums, axis=0) / total
        tl.store(balance_ptr, N * tl.sum(share * mean_prob, axis=0))
        tl.store(z_ptr, tl.sum(lse2, axis=0) / total)
        tl.store(entropy_ptr, tl.sum(ent, axis=0) / total)
        tl.store(stats_ptr, total)
        tl.store(stats_ptr + 1 + cols, share)

    @triton.jit
    def _route_bwd_kernel(
        logit_ptr, idx_ptr, mask_ptr, ggates_ptr, stats_ptr, gbal_ptr, gz_ptr, glogit_ptr,
        T, N: tl.constexpr,
        N_PAD: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, RENORM: tl.constexpr,
        DENSE: tl.constexpr,
        HAS_AUX: tl.constexpr, HAS_MASK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
        cols = tl.arange(0, N_PAD)
        row_ok = rows < T
        col_ok = cols < N
        probs, lse = softmax_rows(logit_ptr, rows, cols, T, N)
        gg = tl.load(ggates_ptr + rows[:, None] * N + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        selected = selected_experts(idx_ptr, rows, cols, T, N, N_PAD, K, BLOCK_T, DENSE)
        glogits = logits_grad(probs, lse, selected, gg, rows, cols, mask_ptr, stats_ptr, gbal_ptr, gz_ptr, T,
                              N, RENORM, DENSE, HAS_AUX, HAS_MASK)
        tl.store(glogit_ptr + rows[:, None] * N + cols[None, :], glogits,
                 mask=row_ok[:, None] & col_ok[None, :])

    # -- launchers: every tensor argument must be contiguous

    def _route_shape(logits: torch.Tensor, top_k: int) -> tuple[int, int, bool, int]:
        """(T, N, dense: every expert taken, N_PAD: the experts' block width, a power of two, at least 2)."""
        T, N = logits.shape
        dense = top_k >= N
        return T, N, dense, pad(N, least=2)

    def route_forward(logits: torch.Tensor, top_k: int, renormalize: bool, mask: torch.Tensor | None,
                      collect: bool):
        """gates (T, N), top_idx (T, K) and, when ``collect``, (balance, z, entropy, stats) 0-d/1-d
        tensors."""
        T, N, dense, n_pad = _route_shape(logits, top_k)
        K = N if dense else top_k
        gates = torch.empty(T, N, device=logits.device, dtype=torch.float32)
        top_idx = torch.empty(T, K, device=logits.device, dtype=torch.int64)
        blocks = triton.cdiv(T, ROUTE_BLOCK_T)
        part = (torch.empty(blocks, 2 * n_pad + 3, device=logits.device, dtype=torch.float32) if collect
                else None)
        mask_u8 = mask.view(torch.uint8) if mask is not None else None
        _route_fwd_kernel[(blocks,)](
            logits, mask_u8, gates, top_idx, part, T, N,
            N_PAD=n_pad, K=K, BLOCK_T=ROUTE_BLOCK_T, RENORM=renormalize, DENSE=dense, COLLECT=collect,
            HAS_MASK=mask is not None, num_warps=NUM_WARPS,
        )
        if not collect:
            return gates, top_idx, None
        return gates, top_idx, route_statistics(part, N, K)

    def route_statistics(part: torch.Tensor, N: int, K: int):
        """(balance, z, entropy, stats) from the forward kernels' per-block partials
        (``store_stat_partials``): the three 0-d auxiliary values and ``stats`` (the weight total, then each
        expert's share), which the backward reads."""
        n_pad = pad(N, least=2)
        balance, z, entropy = (torch.empty((), device=part.device, dtype=torch.float32) for _ in range(3))
        stats = torch.empty(1 + n_pad, device=part.device, dtype=torch.float32)
        _route_stats_kernel[(1,)](part, balance, z, entropy, stats, part.shape[0], N, K, N_PAD=n_pad,
                                  BLOCK_P=STATS_BLOCK_P, num_warps=NUM_WARPS)
        return balance, z, entropy, stats

    def route_backward(logits: torch.Tensor, top_idx: torch.Tensor, mask: torch.Tensor | None,
                       grad_gates: torch.Tensor, stats: torch.Tensor | None,
                       grad_balance: torch.Tensor | None, grad_z: torch.Tensor | None,
                       renormalize: bool) -> torch.Tensor:
        T, N, dense, n_pad = _route_shape(logits, top_idx.shape[1])
        glogits = torch.empty(T, N, device=logits.device, dtype=torch.float32)
        has_aux = stats is not None
        mask_u8 = mask.view(torch.uint8) if mask is not None else None
        _route_bwd_kernel[(triton.cdiv(T, ROUTE_BLOCK_T),)](
            logits, top_idx, mask_u8, grad_gates, stats, grad_balance if has_aux else None,
            grad_z if has_aux else None, glogits, T, N,
            N_PAD=n_pad, K=top_idx.shape[1], BLOCK_T=ROUTE_BLOCK_T, RENORM=renormalize, DENSE=dense,
            HAS_AUX=has_aux, HAS_MASK=mask is not None, num_warps=NUM_WARPS,
        )
        return glogits
