"""The projection ``z = D dropout(x)``, with the router logits ``W_g x`` from the same read of x: the
adapters' one pass over their full-size input.

One call projects a group of G layers that read the same x (q/k/v, gate/up; G = 1 for a layer alone): D, W_g,
z, the logits and the dropout masks are stacked by member, member g draws its mask from the group's seed as
the layer salted g draws it, and dx sums every member's part. The backward keeps x itself (the frozen layer
holds it anyway) and the dropout mask as one bit per element, or only its seed on the torch path.

On CUDA three kernels read each full-size tensor once per direction:

    forward       z = D dropout(x) and logits = W_g x; the mask drawn on the fly (Philox) and kept as bits
    input grad    dx = (dz D) * mask / (1 - p) + dlogits W_g
    weight grad   dD = dz^T dropout(x),  dW_g = dlogits^T x   (split over tokens, summed after)

Router logits stay float32: a bf16 activation times a float32 weight is computed exactly by splitting the
weight into three bf16 pieces (hi + mid + lo carry all 24 mantissa bits), whose products with a bf16 x are
exact and are accumulated in float32 on the tensor cores.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from malora_train.adapters.kernels.common import KERNEL_DTYPES, KernelState, compute_dtype, pad

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none and run the torch path
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# keep flags per int32 word of a packed dropout mask: column c is bit c % MASK_BITS of word c // MASK_BITS
MASK_BITS = 32


@dataclass(frozen=True)
class ProjectionSpec:
    """What a projection computes, besides its tensors."""

    p: float  # dropout probability (0: none, as outside training)
    seed: int | tuple[torch.Tensor, int]  # a number, or (device seed tensor, salt) added when the kernel runs
    compute_dtype: torch.dtype  # z's dtype, and D's for the product
    has_router: bool  # the router logits too


def project_group(x: torch.Tensor, downs: list[torch.Tensor], routers: list[torch.Tensor] | None, p: float,
                  training: bool, salt: int = 0, down_cast: torch.Tensor | None = None,
                  router_stack: torch.Tensor | None = None, *, state: KernelState) -> list:
    """``project`` for G layers that read the same ``x`` (one kernel launch, or one GEMM on the torch path
    without dropout): member g's z (and logits) as ``project`` gives them, each with its own dropout mask,
    drawn from the group's seed as the layer salted ``salt + g`` draws it. ``down_cast`` (G, R, n) and
    ``router_stack`` (G, N, n): the weights already cast and stacked (``working_copies``); gradients still go
    to ``downs`` and ``routers``."""
    p = p if training else 0.0
    seed = state.dropout_seed(salt) if p > 0 else 0
    spec = ProjectionSpec(p, seed, compute_dtype(x), has_router=routers is not None)
    outputs = _Project.apply(spec, state, x, down_cast, router_stack, *downs, *(routers or ()))
    if not spec.has_router:
        return list(outputs)
    G = len(downs)
    return list(zip(outputs[:G], outputs[G:]))


def project(x: torch.Tensor, down: torch.Tensor, router: torch.Tensor | None, p: float, training: bool,
            salt: int = 0, down_cast: torch.Tensor | None = None, *, state: KernelState):
    """``z = down dropout(x)`` in the compute dtype and, when ``router`` is given, float32 logits
    ``router x`` (the router sees x without dropout). Returns z, or (z, logits) with a router.
    ``salt`` tells layers apart under ``KernelState.device_seed`` (each layer's mask its own); ``down_cast``:
    ``down`` already cast (``working_copies``)."""
    return project_group(x, [down], [router] if router is not None else None, p, training, salt,
                         down_cast.unsqueeze(0) if down_cast is not None else None, state=state)[0]


class _Project(torch.autograd.Function):
    """Projects a group of G layers reading the same x. Inputs: the spec, the state, x, the group's weights
    already cast and stacked (``down_cast``, ``router_stack``; None: done here), then the G down-projections
    and the G routers (none without a router). Outputs: the G z's, then the G logits."""

    @staticmethod
    def forward(ctx, spec: ProjectionSpec, state: KernelState, x, down_cast, router_stack, *weights):
        cdt = spec.compute_dtype
        G = len(weights) // (2 if spec.has_router else 1)
        downs, routers = weights[:G], weights[G:]
        if down_cast is not None and down_cast.dtype == cdt:  # ready (working_copies)
            down_c = down_cast
        else:
            down_c = (downs[0].unsqueeze(0) if G == 1 else torch.stack(downs)).to(cdt)  # saved for backward
        router = None
        if spec.has_router:
            router = router_stack if router_stack is not None else (
                routers[0].unsqueeze(0) if G == 1 else torch.stack(routers))
        z, logits, bits = state.run(_use_kernels(state, x, cdt),
                                    lambda: project_forward(x, down_c, router, spec.p, spec.seed, cdt),
                                    lambda: _project_torch(x, down_c, router, spec.p, spec.seed, cdt))
        ctx.save_for_backward(x, down_c, router, bits)
        ctx.spec, ctx.state, ctx.down_dtype = spec, state, downs[0].dtype
        outputs = tuple(z.unbind(0))
        return outputs + tuple(logits.unbind(0)) if spec.has_router else outputs

    @staticmethod
    def backward(ctx, *grads):
        x, down_c, router, bits = ctx.saved_tensors
        spec, state = ctx.spec, ctx.state
        p, cdt = spec.p, spec.compute_dtype
        G = down_c.shape[0]
        _spec, _state, need_x, _down_cast, _router_stack, *need_weights = ctx.needs_input_grad
        need_down = any(need_weights[:G])
        need_router = router is not None and any(need_weights[G:])
        grad_z = _stacked(grads[:G], x.shape[0], down_c.shape[1], cdt, x.device)
        grad_logits = None
        if router is not None:
            grad_logits = _stacked(grads[G:], x.shape[0], router.shape[1], logits_dtype(x), x.device)
        gx, gdown, grouter = state.run(
            _use_kernels(state, x, cdt),
            lambda: _project_backward_kernels(x, down_c, router, bits, p, cdt, grad_z, grad_logits,
                                              need_x, need_down, need_router),
            lambda: _project_backward_torch(x, down_c, router, bits, p, spec.seed, grad_z, grad_logits,
                                            need_x, need_down, need_router))
        gdowns = [gdown[g].to(ctx.down_dtype) if gdown is not None else None for g in range(G)]
        grouters = [] if router is None else [grouter[g] if grouter is not None else None for g in range(G)]
        # one per input: spec, state, x, down_cast, router_stack, then the weights
        return None, None, gx, None, None, *gdowns, *grouters


def _use_kernels(state: KernelState, x: torch.Tensor, cdt: torch.dtype) -> bool:
    """The kernels need Triton, a CUDA x in contiguous rows and a half-precision compute dtype."""
    return triton is not None and state.kernels_allowed(x) and cdt in KERNEL_DTYPES and x.is_contiguous()


# -- the torch path -----------------------------------------------------------------------------------------

def member_seed(seed: int, member: int) -> int:
    """The torch path's dropout seed of a group's ``member`` (member 0: the group's own). It moves the low 32
    bits, the only ones the CPU generator reads; the kernels salt member g in Philox's high word instead."""
    return (seed + member * 0x9E3779B9) % 2**63


def unpack_keep(bits: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """The scaled keep mask (T, n) from the kernels' packed bits (one int32 word per MASK_BITS columns)."""
    shifts = torch.arange(MASK_BITS, device=bits.device, dtype=torch.int32)
    keep = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(bits.shape[0], -1)[:, :n]
    return keep.float().div_(1.0 - p)


def _keep_mask(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Bernoulli(1 - p) keep mask scaled by 1 / (1 - p), drawn again identically from ``seed``; in at
    least float32, as F.dropout scales (a bf16 1/0.95 would be off by 2e-3)."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    dtype = torch.promote_types(x.dtype, torch.float32)
    mask = torch.empty(x.shape, device=x.device, dtype=dtype).bernoulli_(1.0 - p, generator=generator)
    return mask.div_(1.0 - p)


def logits_dtype(x: torch.Tensor) -> torch.dtype:
    """Router logits are float32, or float64 for float64 inputs (as ``router.router_logits``)."""
    return torch.promote_types(x.dtype, torch.float32)


def _no_autocast(t: torch.Tensor):
    return torch.autocast(device_type=t.device.type, enabled=False)


def _stacked(grads, T: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The members' output gradients as one contiguous (G, T, width) tensor (zeros for an unused output)."""
    grads = [g if g is not None else torch.zeros(T, width, dtype=dtype, device=device) for g in grads]
    return grads[0].unsqueeze(0).contiguous() if len(grads) == 1 else torch.stack(grads)


def _member_masks(x: torch.Tensor, p: float, seed: int, G: int, bits: torch.Tensor | None):
    """Each member's scaled keep mask (None without dropout): from the kernels' bits, or drawn again."""
    if p == 0:
        return [None] * G
    if bits is not None:
        return [unpack_keep(bits[g], x.shape[1], p) for g in range(G)]
    return [_keep_mask(x, p, member_seed(seed, g)) for g in range(G)]


def _project_torch(x, down_c, router, p, seed, cdt):
    """The torch path of the group's forward: (z, logits, no mask bits). Without dropout one GEMM for every
    member's z (and one for the logits); with it, each member's own mask."""
    if isinstance(seed, tuple):
        raise RuntimeError("a device-side dropout seed (trainer.cuda_graphs) needs the Triton adapter "
                           "kernels; set adapter.dropout=0 to run without them")
    G, R, n = down_c.shape
    T = x.shape[0]
    with _no_autocast(x):
        if p > 0:
            z = torch.stack([F.linear((x * mask).to(cdt), down_c[g])
                             for g, mask in enumerate(_member_masks(x, p, seed, G, None))])
        else:
            z = F.linear(x.to(cdt), down_c.reshape(G * R, n)).view(T, G, R).transpose(0, 1)
        logits = None
        if router is not None:
            ldt = logits_dtype(x)
            N = router.shape[1]
            logits = F.linear(x.to(ldt), router.reshape(G * N, n).to(ldt)).view(T, G, N).transpose(0, 1)
    return z, logits, None


def _project_backward_torch(x, down_c, router, bits, p, seed, grad_z, grad_logits, need_x, need_down,
                            need_router):
    G = down_c.shape[0]
    masks = _member_masks(x, p, seed, G, bits)
    gx = gdown = grouter = None
    if need_x:
        gx = sum((grad_z[g] @ down_c[g]) * mask if mask is not None else grad_z[g] @ down_c[g]
                 for g, mask in enumerate(masks)).to(x.dtype)
        if router is not None:
            gx = gx + sum(grad_logits[g] @ router[g].to(grad_logits.dtype) for g in range(G)).to(x.dtype)
    if need_down:
        gdown = torch.stack([grad_z[g].t() @ (x * mask if mask is not None else x).to(down_c.dtype)
                             for g, mask in enumerate(masks)])
    if need_router:
        grouter = torch.stack([grad_logits[g].t() @ x.to(grad_logits.dtype)
                               for g in range(G)]).to(router.dtype)
    return gx, gdown, grouter


def _project_backward_kernels(x, down_c, router, bits, p, cdt, grad_z, grad_logits, need_x, need_down,
                              need_router):
    """(dx, dD, dW_g) as ``_project_backward_torch`` gives them, from the two backward kernels."""
    gx = gdown = grouter = None
    if need_x:
        gx = project_input_grad(grad_z, grad_logits, down_c, router, bits, p, x.dtype)
    if need_down or need_router:
        gdown, grouter = project_weight_grad(
            grad_z if need_down else None, grad_logits if need_router else None, x, bits, p,
            down_c.shape[1], router.shape[1] if router is not None else 1, cdt)
    return gx, gdown, grouter


# -- the Triton kernels and their launchers (CUDA with Triton only) ------------------------------------------
# Each program computes one block of its kernel's output: a larger block re-reads less of the other operand,
# a smaller one gives more programs to spread over the multiprocessors.

# Columns of x per step of the forward's loop over n. One Philox call per row and step gives four draws, each
# masking a quarter of the step, so this is part of the masks' definition: another value draws other masks
# for the same seed. A quarter must hold whole mask words (a multiple of 4 * MASK_BITS).
FORWARD_BLOCK_K = 128
INPUT_GRAD_BLOCK = (64, 128)  # rows and columns of dx per program (columns: whole mask words)
WEIGHT_GRAD_BLOCK = (64, 128)  # tokens per loop step and columns of dD, dW_g per program (whole mask words)
WEIGHT_GRAD_WAVES = 4  # programs per multiprocessor the weight gradient aims at, by splitting the token range
FORWARD_STAGES = 3  # loads the forward's loop keeps in flight (Triton's default): hides latency, costs SMEM
BACKWARD_STAGES = 2  # the same for the backward kernels' loops
NUM_WARPS = 4  # warps per program, in every kernel here (Triton's default)
SPLIT_DTYPE = torch.bfloat16  # the pieces an exact float32 router product splits its weight into


def _forward_rows(T: int) -> int:
    """Rows of x per forward program: 32 once that makes at least 100 programs, else 16. Every program reads
    all of D, so taller blocks read it fewer times; shorter ones give a short input more programs."""
    return 32 if T >= 32 * 100 else 16


if triton is not None:

    @triton.jit
    def _split3(v, SPLIT: tl.constexpr):
        """float32 v == hi + mid + lo (each in the SPLIT dtype, bf16 in practice) up to float32 rounding."""
        hi = v.to(SPLIT)
        rest = v - hi.to(tl.float32)
        mid = rest.to(SPLIT)
        lo = (rest - mid.to(tl.float32)).to(SPLIT)
        return hi, mid, lo

    @triton.jit
    def _unpack_keep(bits_ptr, rows, row_ok, word0, W, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                     MASK_BITS: tl.constexpr):
        """(BLOCK_R, BLOCK_C) keep flags of columns [MASK_BITS*word0, MASK_BITS*word0 + BLOCK_C) from the
        packed mask (contiguous, W words a row)."""
        words_idx = word0 + tl.arange(0, BLOCK_C // MASK_BITS)
        words = tl.load(bits_ptr + rows[:, None] * W + words_idx[None, :],
                        mask=row_ok[:, None] & (words_idx < W)[None, :], other=0)
        shifts = tl.arange(0, MASK_BITS)
        flags = (words[:, :, None] >> shifts[None, None, :]) & 1
        return tl.reshape(flags, (BLOCK_R, BLOCK_C)) != 0

    @triton.jit(do_not_specialize=["seed"])
    def _project_fwd_kernel(
        x_ptr, d_ptr, w_ptr, z_ptr, logit_ptr, bits_ptr, seed_ptr, T, n, seed, threshold, scale,
        R: tl.constexpr, N: tl.constexpr,
        R_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
        HAS_ROUTER: tl.constexpr, DROPOUT: tl.constexpr, CDT: tl.constexpr, SPLIT: tl.constexpr,
        X_EXACT: tl.constexpr, SEED_FROM_PTR: tl.constexpr, MASK_BITS: tl.constexpr,
    ):
        # Every tensor is contiguous (the launchers make sure): rows of x are n long, of the mask W words.
        # (threshold and scale stay runtime values: as constexprs they make Triton 3.6 hoist the mask
        # arithmetic into the dot-operand layout, which its sm_90 lowering then fails on.)
        # Each Philox call gives four 32-bit draws; draw j masks the j-th quarter of a BLOCK_K column tile.
        Q: tl.constexpr = BLOCK_K // 4
        W = tl.cdiv(n, MASK_BITS)
        pid = tl.program_id(0)
        member = tl.program_id(1).to(tl.int64)  # the group's layer: its slice of D, W_g, z, logits, mask
        d_ptr += member * R * n
        z_ptr += member * T * R
        if HAS_ROUTER:
            w_ptr += member * N * n
            logit_ptr += member * T * N
        if DROPOUT:
            bits_ptr += member * T * W
        rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < T
        q = tl.arange(0, Q)
        rr = tl.arange(0, R_PAD)
        nn = tl.arange(0, N_PAD)
        acc = tl.zeros((BLOCK_M, R_PAD), tl.float32)
        acc_l = tl.zeros((BLOCK_M, N_PAD), tl.float32)
        row_draws = tl.cdiv(n, BLOCK_K) * Q  # Philox counters per row
        if SEED_FROM_PTR:  # a captured step: the seed is read at replay time, ``seed`` salts it per layer
            seed = tl.load(seed_ptr) + seed
        seed = seed + (member << 32)  # the next layer's salt
        for k0 in range(0, n, BLOCK_K):
            b = k0 // BLOCK_K
            if DROPOUT:
                counter = rows[:, None].to(tl.int64) * row_draws + (b * Q + q)[None, :]
                r0, r1, r2, r3 = tl.randint4x(seed, counter)
            for j in tl.static_range(4):
                cols = k0 + j * Q + q
                col_ok = cols < n
                xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * n + cols[None, :],
                             mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                dt = tl.load(d_ptr + rr[None, :] * n + cols[:, None],
                             mask=(rr < R)[None, :] & col_ok[:, None], other=0.0).to(CDT)
                xf = xt.to(tl.float32)
                if DROPOUT:
                    if j == 0:
                        draw = r0
                    elif j == 1:
                        draw = r1
                    elif j == 2:
                        draw = r2
                    else:
                        draw = r3
                    keep = (draw >> 8).to(tl.int32) >= threshold
                    xd = tl.where(keep, xf * scale, 0.0).to(CDT)
                    flags = tl.reshape(keep.to(tl.int32), (BLOCK_M, Q // MASK_BITS, MASK_BITS))
                    shifts = tl.arange(0, MASK_BITS)
                    words = tl.sum(flags << shifts[None, None, :], axis=2)
                    words_idx = (k0 + j * Q) // MASK_BITS + tl.arange(0, Q // MASK_BITS)
                    tl.store(bits_ptr + rows[:, None] * W + words_idx[None, :], words,
                             mask=row_ok[:, None] & (words_idx < W)[None, :])
                else:
                    xd = xt.to(CDT)
                acc += tl.dot(xd, dt)
                if HAS_ROUTER:
                    wt = tl.load(w_ptr + nn[None, :] * n + cols[:, None],
                                 mask=(nn < N)[None, :] & col_ok[:, None], other=0.0)
                    if X_EXACT:
                        xs = xt.to(SPLIT)
                        w_hi, w_mid, w_lo = _split3(wt, SPLIT)
                        acc_l += tl.dot(xs, w_hi)
                        acc_l += tl.dot(xs, w_mid)
                        acc_l += tl.dot(xs, w_lo)
                    else:
                        acc_l += tl.dot(xf, wt, input_precision="ieee")
        tl.store(z_ptr + rows[:, None] * R + rr[None, :], acc.to(CDT),
                 mask=row_ok[:, None] & (rr < R)[None, :])
        if HAS_ROUTER:
            tl.store(logit_ptr + rows[:, None] * N + nn[None, :], acc_l,
                     mask=row_ok[:, None] & (nn < N)[None, :])

    @triton.jit
    def _project_input_grad_kernel(
        gz_ptr, gl_ptr, d_ptr, w_ptr, bits_ptr, gx_ptr, T, n, scale,
        R: tl.constexpr, N: tl.constexpr,
        R_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_ROUTER: tl.constexpr, DROPOUT: tl.constexpr, CDT: tl.constexpr, SPLIT: tl.constexpr,
        G: tl.constexpr, MASK_BITS: tl.constexpr,
    ):
        W = tl.cdiv(n, MASK_BITS)
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < T
        col_ok = cols < n
        rr = tl.arange(0, R_PAD)
        nn = tl.arange(0, N_PAD)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for member in tl.static_range(G):  # dx is the sum of every member's
            gz = tl.load(gz_ptr + member * T * R + rows[:, None] * R + rr[None, :],
                         mask=row_ok[:, None] & (rr < R)[None, :], other=0.0).to(CDT)
            d = tl.load(d_ptr + member * R * n + rr[:, None] * n + cols[None, :],
                        mask=(rr < R)[:, None] & col_ok[None, :], other=0.0).to(CDT)
            part = tl.dot(gz, d)
            if DROPOUT:
                keep = _unpack_keep(bits_ptr + member * T * W, rows, row_ok, pid_n * (BLOCK_N // MASK_BITS),
                                    W, BLOCK_M, BLOCK_N, MASK_BITS)
                part = tl.where(keep, part * scale, 0.0)
            acc += part
            if HAS_ROUTER:
                gl = tl.load(gl_ptr + member * T * N + rows[:, None] * N + nn[None, :],
                             mask=row_ok[:, None] & (nn < N)[None, :], other=0.0)
                w = tl.load(w_ptr + member * N * n + nn[:, None] * n + cols[None, :],
                            mask=(nn < N)[:, None] & col_ok[None, :], other=0.0)
                g_hi, g_mid, g_lo = _split3(gl, SPLIT)
                w_hi, w_mid, w_lo = _split3(w, SPLIT)
                # the result is rounded to the activation dtype: the terms below 2^-16 do not matter
                acc += tl.dot(g_hi, w_hi)
                acc += tl.dot(g_hi, w_mid)
                acc += tl.dot(g_mid, w_hi)
        tl.store(gx_ptr + rows[:, None].to(tl.int64) * n + cols[None, :], acc.to(gx_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit
    def _project_weight_grad_kernel(
        gz_ptr, gl_ptr, x_ptr, bits_ptr, part_ptr, T, n, rows_per_split, scale,
        R: tl.constexpr, N: tl.constexpr,
        R_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_ROUTER: tl.constexpr, DROPOUT: tl.constexpr, CDT: tl.constexpr, SPLIT: tl.constexpr,
        X_EXACT: tl.constexpr, NEED_D: tl.constexpr, MASK_BITS: tl.constexpr,
    ):
        """Partial sums over one token range: part[member, split, :R_PAD] = dD, part[member, split, R_PAD:]
        = dW_g."""
        W = tl.cdiv(n, MASK_BITS)
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        member = tl.program_id(2).to(tl.int64)
        if NEED_D:
            gz_ptr += member * T * R
        if HAS_ROUTER:
            gl_ptr += member * T * N
        if DROPOUT:
            bits_ptr += member * T * W
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        rr = tl.arange(0, R_PAD)
        nn = tl.arange(0, N_PAD)
        acc_d = tl.zeros((R_PAD, BLOCK_N), tl.float32)
        acc_w = tl.zeros((N_PAD, BLOCK_N), tl.float32)
        start = pid_s * rows_per_split
        stop = tl.minimum(start + rows_per_split, T)
        for t0 in range(start, stop, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < stop
            xt = tl.load(x_ptr + rows[:, None].to(tl.int64) * n + cols[None, :],
                         mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            if NEED_D:
                gz = tl.load(gz_ptr + rows[:, None] * R + rr[None, :],
                             mask=row_ok[:, None] & (rr < R)[None, :], other=0.0).to(CDT)
                if DROPOUT:
                    keep = _unpack_keep(bits_ptr, rows, row_ok, pid_n * (BLOCK_N // MASK_BITS), W, BLOCK_T,
                                        BLOCK_N, MASK_BITS)
                    xd = tl.where(keep, xt.to(tl.float32) * scale, 0.0).to(CDT)
                else:
                    xd = xt.to(CDT)
                acc_d += tl.dot(tl.trans(gz), xd)
            if HAS_ROUTER:
                gl = tl.load(gl_ptr + rows[:, None] * N + nn[None, :],
                             mask=row_ok[:, None] & (nn < N)[None, :], other=0.0)
                if X_EXACT:
                    xs = xt.to(SPLIT)
                    g_hi, g_mid, g_lo = _split3(gl, SPLIT)
                    acc_w += tl.dot(tl.trans(g_hi), xs)
                    acc_w += tl.dot(tl.trans(g_mid), xs)
                    acc_w += tl.dot(tl.trans(g_lo), xs)
                else:
                    acc_w += tl.dot(tl.trans(gl), xt.to(tl.float32), input_precision="ieee")
        part = part_ptr + (member * tl.num_programs(1) + pid_s) * (R_PAD + N_PAD) * n
        if NEED_D:
            tl.store(part + rr[:, None] * n + cols[None, :], acc_d, mask=col_ok[None, :])
        if HAS_ROUTER:
            tl.store(part + (R_PAD + nn[:, None]) * n + cols[None, :], acc_w, mask=col_ok[None, :])

    # -- launchers: every tensor argument must be contiguous

    @functools.cache
    def _multiprocessors(device: torch.device) -> int:
        return torch.cuda.get_device_properties(device).multi_processor_count

    def _triton_dtype(dtype: torch.dtype):
        return getattr(tl, KERNEL_DTYPES[dtype])

    def keep_threshold(p: float) -> int:
        """A 24-bit uniform draw ``u`` keeps its element when ``u >= threshold`` (probability 1 - p)."""
        return int(round(p * (1 << 24)))

    def mask_words(n: int) -> int:
        return triton.cdiv(n, MASK_BITS)

    def project_forward(x: torch.Tensor, down: torch.Tensor, router: torch.Tensor | None, p: float,
                        seed: int | tuple[torch.Tensor, int], cdt: torch.dtype):
        """For a group of G layers reading x: (z (G, T, R) in ``cdt``, logits (G, T, N) float32 or None,
        packed keep masks (G, T, W) int32 or None) from ``down`` (G, R, n) and ``router`` (G, N, n) or None.
        ``down`` is best passed in ``cdt``: every block of rows reads all of it. ``seed``: the dropout seed,
        or (a one-element int64 device tensor, an int added to it) read when the kernel runs; member g adds
        g << 32."""
        T, n = x.shape
        G, R = down.shape[:2]
        N = router.shape[1] if router is not None else 1
        dropout = p > 0
        z = torch.empty(G, T, R, device=x.device, dtype=cdt)
        logits = torch.empty(G, T, N, device=x.device, dtype=torch.float32) if router is not None else None
        bits = torch.empty(G, T, mask_words(n), device=x.device, dtype=torch.int32) if dropout else None
        block_m = _forward_rows(T)
        seed_tensor, seed = seed if isinstance(seed, tuple) else (None, seed)
        _project_fwd_kernel[(triton.cdiv(T, block_m), G)](
            x, down, router, z, logits, bits, seed_tensor, T, n, seed, keep_threshold(p), 1.0 / (1.0 - p),
            R=R, N=N, R_PAD=pad(R), N_PAD=pad(N),
            BLOCK_M=block_m, BLOCK_K=FORWARD_BLOCK_K, HAS_ROUTER=router is not None, DROPOUT=dropout,
            CDT=_triton_dtype(cdt), SPLIT=_triton_dtype(SPLIT_DTYPE), X_EXACT=x.dtype == SPLIT_DTYPE,
            SEED_FROM_PTR=seed_tensor is not None, MASK_BITS=MASK_BITS, num_warps=NUM_WARPS,
            num_stages=FORWARD_STAGES,
        )
        return z, logits, bits

    def project_input_grad(gz: torch.Tensor, glogits: torch.Tensor | None, down: torch.Tensor,
                           router: torch.Tensor | None, bits: torch.Tensor | None, p: float,
                           out_dtype: torch.dtype) -> torch.Tensor:
        """dx (T, n), summed over the group's G members (every tensor stacked by member, as
        ``project_forward``)."""
        G, T, R = gz.shape
        n = down.shape[2]
        N = router.shape[1] if router is not None else 1
        block_m, block_n = INPUT_GRAD_BLOCK
        gx = torch.empty(T, n, device=gz.device, dtype=out_dtype)
        grid = (triton.cdiv(T, block_m), triton.cdiv(n, block_n))
        _project_input_grad_kernel[grid](
            gz, glogits, down, router, bits, gx, T, n, 1.0 / (1.0 - p),
            R=R, N=N, R_PAD=pad(R), N_PAD=pad(N), BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_ROUTER=router is not None, DROPOUT=bits is not None, CDT=_triton_dtype(gz.dtype),
            SPLIT=_triton_dtype(SPLIT_DTYPE), G=G, MASK_BITS=MASK_BITS, num_warps=NUM_WARPS,
            num_stages=BACKWARD_STAGES,
        )
        return gx

    def project_weight_grad(gz: torch.Tensor | None, glogits: torch.Tensor | None, x: torch.Tensor,
                            bits: torch.Tensor | None, p: float, R: int, N: int, cdt: torch.dtype):
        """(dD (G, R, n) float32 or None, dW_g (G, N, n) float32 or None) for a group of G members (``gz``
        (G, T, R), ``glogits`` (G, T, N), ``bits`` (G, T, W)); ``gz`` None skips dD."""
        T, n = x.shape
        G = (gz if gz is not None else glogits).shape[0]
        block_t, block_n = WEIGHT_GRAD_BLOCK
        col_tiles = triton.cdiv(n, block_n)
        # enough programs to fill the GPU (WEIGHT_GRAD_WAVES per multiprocessor): split the token range, then
        # sum the float32 partials of dD and dW_g (stacked in one buffer: one sum for both)
        programs = WEIGHT_GRAD_WAVES * _multiprocessors(x.device)
        splits = max(1, min(triton.cdiv(T, block_t), triton.cdiv(programs, col_tiles)))
        rows_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
        splits = triton.cdiv(T, rows_per_split)
        r_pad, n_pad = pad(R), pad(N)
        need_d, has_router = gz is not None, glogits is not None
        part = torch.empty(G, splits, r_pad + n_pad, n, device=x.device, dtype=torch.float32)
        _project_weight_grad_kernel[(col_tiles, splits, G)](
            gz, glogits, x, bits, part, T, n, rows_per_split, 1.0 / (1.0 - p),
            R=R, N=N, R_PAD=r_pad, N_PAD=n_pad, BLOCK_T=block_t, BLOCK_N=block_n,
            HAS_ROUTER=has_router, DROPOUT=bits is not None, CDT=_triton_dtype(cdt),
            SPLIT=_triton_dtype(SPLIT_DTYPE), X_EXACT=x.dtype == SPLIT_DTYPE, NEED_D=need_d,
            MASK_BITS=MASK_BITS, num_warps=NUM_WARPS, num_stages=BACKWARD_STAGES,
        )
        total = part[:, 0] if splits == 1 else part.sum(1)
        return total[:, :R] if need_d else None, total[:, r_pad:r_pad + N] if has_router else None
