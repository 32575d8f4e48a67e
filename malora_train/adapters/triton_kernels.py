"""Triton kernels for the fused adapter path (CUDA only; ``fused.py`` falls back to plain torch elsewhere).

Three kernels cover the part of an adapter that touches full-size activations, so each full-size
tensor is read or written once per direction. Each takes a group of G layers that read the same x (q/k/v,
gate/up; G = 1 for a layer on its own): D, W_g, z, logits and the mask are stacked by member, member g's
dropout seed is the group's plus g in Philox's high word, and dx sums every member's contribution:

    project_forward   z = D dropout(x) and router logits = W_g x, one read of x; the dropout mask is
                      drawn on the fly (Philox) and kept as one bit per element for the backward
    project_input_grad   dx = (dz D) * mask / (1 - p) + dlogits W_g
    project_weight_grad  dD = dz^T dropout(x),  dW_g = dlogits^T x   (split over tokens, summed after)

two more do the whole top-K routing of a token block with its auxiliary-loss statistics, forward
and backward, and two the rank-space side of ``gated_up`` (small tensors, but one kernel each instead of a
chain of small ones):

    expand_forward    gated = gates * expand(z)   (expand: z C^T for MALoRA, z itself, or z per expert)
    expand_backward   dgates, dz and dC from dgated, with u = expand(z) recomputed

 Router logits stay float32: a bf16 activation times a float32 weight is computed exactly
by splitting the weight into three bf16 pieces (hi + mid + lo carry all 24 mantissa bits), whose
products with a bf16 x are exact and are accumulated in float32 on the tensor cores.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}
MASK_BITS = 32  # dropout mask bits per stored int32 word


def _pad(value: int) -> int:
    return max(16, triton.next_power_of_2(value))


def keep_threshold(p: float) -> int:
    """A 24-bit uniform draw ``u`` keeps its element when ``u >= threshold`` (probability 1 - p)."""
    return int(round(p * (1 << 24)))


@triton.jit
def _split3(v, SPLIT: tl.constexpr):
    """float32 v == hi + mid + lo (each in the SPLIT dtype, bf16 in practice) up to float32 rounding."""
    hi = v.to(SPLIT)
    rest = v - hi.to(tl.float32)
    mid = rest.to(SPLIT)
    lo = (rest - mid.to(tl.float32)).to(SPLIT)
    return hi, mid, lo


@triton.jit
def _unpack_keep(bits_ptr, rows, row_ok, word0, W, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """(BLOCK_R, BLOCK_C) keep flags of columns [32*word0, 32*word0 + BLOCK_C) from the packed mask
    (contiguous, W words a row)."""
    words_idx = word0 + tl.arange(0, BLOCK_C // 32)
    words = tl.load(bits_ptr + rows[:, None] * W + words_idx[None, :],
                    mask=row_ok[:, None] & (words_idx < W)[None, :], other=0)
    shifts = tl.arange(0, 32)
    flags = (words[:, :, None] >> shifts[None, None, :]) & 1
    return tl.reshape(flags, (BLOCK_R, BLOCK_C)) != 0


@triton.jit(do_not_specialize=["seed"])
def _project_fwd_kernel(
    x_ptr, d_ptr, w_ptr, z_ptr, logit_ptr, bits_ptr, seed_ptr, T, n, seed, threshold, scale,
    R: tl.constexpr, N: tl.constexpr,
    R_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_ROUTER: tl.constexpr, DROPOUT: tl.constexpr, CDT: tl.constexpr, SPLIT: tl.constexpr,
    X_EXACT: tl.constexpr, SEED_FROM_PTR: tl.constexpr,
):
    # Every tensor is contiguous (the launchers make sure): rows of x are n long, of the mask W words.
    # (threshold and scale stay runtime values: as constexprs they make Triton 3.6 hoist the mask
    # arithmetic into the dot-operand layout, which its sm_90 lowering then fails on.)
    # Each Philox call gives four 32-bit draws; draw j masks the j-th quarter of a BLOCK_K column tile.
    Q: tl.constexpr = BLOCK_K // 4
    W = tl.cdiv(n, 32)
    pid = tl.program_id(0)
    member = tl.program_id(1).to(tl.int64)  # which layer of the group: its slice of D, W_g, z, logits, mask
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
                flags = tl.reshape(keep.to(tl.int32), (BLOCK_M, Q // 32, 32))
                shifts = tl.arange(0, 32)
                words = tl.sum(flags << shifts[None, None, :], axis=2)
                words_idx = (k0 + j * Q) // 32 + tl.arange(0, Q // 32)
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
    tl.store(z_ptr + rows[:, None] * R + rr[None, :], acc.to(CDT), mask=row_ok[:, None] & (rr < R)[None, :])
    if HAS_ROUTER:
        tl.store(logit_ptr + rows[:, None] * N + nn[None, :], acc_l, mask=row_ok[:, None] & (nn < N)[None, :])


@triton.jit
def _project_input_grad_kernel(
    gz_ptr, gl_ptr, d_ptr, w_ptr, bits_ptr, gx_ptr, T, n, scale,
    R: tl.constexpr, N: tl.constexpr,
    R_PAD: tl.constexpr, N_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_ROUTER: tl.constexpr, DROPOUT: tl.constexpr, CDT: tl.constexpr, SPLIT: tl.constexpr,
    G: tl.constexpr,
):
    W = tl.cdiv(n, 32)
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
            keep = _unpack_keep(bits_ptr + member * T * W, rows, row_ok, pid_n * (BLOCK_N // 32), W, BLOCK_M,
                                BLOCK_N)
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
    X_EXACT: tl.constexpr, NEED_D: tl.constexpr,
):
    """Partial sums over one token range: part[member, split, :R_PAD] = dD, part[member, split, R_PAD:] = dW_g."""
    W = tl.cdiv(n, 32)
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
            gz = tl.load(gz_ptr + rows[:, None] * R + rr[None, :], mask=row_ok[:, None] & (rr < R)[None, :],
                         other=0.0).to(CDT)
            if DROPOUT:
                keep = _unpack_keep(bits_ptr, rows, row_ok, pid_n * (BLOCK_N // 32), W, BLOCK_T, BLOCK_N)
                xd = tl.where(keep, xt.to(tl.float32) * scale, 0.0).to(CDT)
            else:
                xd = xt.to(CDT)
            acc_d += tl.dot(tl.trans(gz), xd)
        if HAS_ROUTER:
            gl = tl.load(gl_ptr + rows[:, None] * N + nn[None, :], mask=row_ok[:, None] & (nn < N)[None, :],
                         other=0.0)
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


# -- launchers: every tensor argument must be contiguous --------------------------------------------------

@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def mask_words(n: int) -> int:
    return triton.cdiv(n, MASK_BITS)


def project_forward(x: torch.Tensor, down: torch.Tensor, router: torch.Tensor | None, p: float,
                    seed: int | tuple[torch.Tensor, int], compute_dtype: torch.dtype,
                    split_dtype: torch.dtype = torch.bfloat16, block_m: int | None = None, block_k: int = 128,
                    num_warps: int = 4, num_stages: int = 3):
    """For a group of G layers reading x: (z (G, T, R) compute dtype, logits (G, T, N) float32 or None, packed
    keep masks (G, T, W) int32 or None) from ``down`` (G, R, n) and ``router`` (G, N, n) or None. ``down`` is
    best passed in the compute dtype: every block of rows reads all of it. ``seed``: the dropout seed, or (a
    one-element int64 device tensor, an int added to it) read when the kernel runs; member g adds g << 32."""
    T, n = x.shape
    G, R = down.shape[:2]
    N = router.shape[1] if router is not None else 1
    dropout = p > 0
    z = torch.empty(G, T, R, device=x.device, dtype=compute_dtype)
    logits = torch.empty(G, T, N, device=x.device, dtype=torch.float32) if router is not None else None
    bits = torch.empty(G, T, mask_words(n), device=x.device, dtype=torch.int32) if dropout else None
    block_m = block_m or (32 if T >= 32 * 100 else 16)
    seed_tensor, seed = seed if isinstance(seed, tuple) else (None, seed)
    _project_fwd_kernel[(triton.cdiv(T, block_m), G)](
        x, down, router, z, logits, bits, seed_tensor, T, n, seed, keep_threshold(p), 1.0 / (1.0 - p),
        R=R, N=N, R_PAD=_pad(R), N_PAD=_pad(N),
        BLOCK_M=block_m, BLOCK_K=block_k, HAS_ROUTER=router is not None, DROPOUT=dropout,
        CDT=_TL_DTYPES[compute_dtype], SPLIT=_TL_DTYPES[split_dtype], X_EXACT=x.dtype == split_dtype,
        SEED_FROM_PTR=seed_tensor is not None, num_warps=num_warps, num_stages=num_stages,
    )
    return z, logits, bits


def project_input_grad(gz: torch.Tensor, glogits: torch.Tensor | None, down: torch.Tensor,
                       router: torch.Tensor | None, bits: torch.Tensor | None, p: float, out_dtype: torch.dtype,
                       split_dtype: torch.dtype = torch.bfloat16, block_m: int = 64, block_n: int = 128,
                       num_warps: int = 4, num_stages: int = 2) -> torch.Tensor:
    """dx (T, n), summed over the group's G members (every tensor stacked by member, as ``project_forward``)."""
    G, T, R = gz.shape
    n = down.shape[2]
    N = router.shape[1] if router is not None else 1
    gx = torch.empty(T, n, device=gz.device, dtype=out_dtype)
    grid = (triton.cdiv(T, block_m), triton.cdiv(n, block_n))
    _project_input_grad_kernel[grid](
        gz, glogits, down, router, bits, gx, T, n, 1.0 / (1.0 - p),
        R=R, N=N, R_PAD=_pad(R), N_PAD=_pad(N), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ROUTER=router is not None, DROPOUT=bits is not None, CDT=_TL_DTYPES[gz.dtype],
        SPLIT=_TL_DTYPES[split_dtype], G=G, num_warps=num_warps, num_stages=num_stages,
    )
    return gx


def project_weight_grad(gz: torch.Tensor | None, glogits: torch.Tensor | None, x: torch.Tensor,
                        bits: torch.Tensor | None, p: float, R: int, N: int, compute_dtype: torch.dtype,
                        split_dtype: torch.dtype = torch.bfloat16, block_t: int = 64, block_n: int = 128,
                        waves: int = 4, num_warps: int = 4, num_stages: int = 2):
    """(dD (G, R, n) float32 or None, dW_g (G, N, n) float32 or None) for a group of G members (``gz`` (G, T, R),
    ``glogits`` (G, T, N), ``bits`` (G, T, W)); ``gz`` None skips dD."""
    T, n = x.shape
    G = (gz if gz is not None else glogits).shape[0]
    col_tiles = triton.cdiv(n, block_n)
    # enough programs to fill the GPU (``waves`` per multiprocessor): split the token range, then sum
    # the float32 partials of dD and dW_g (stacked in one buffer: one sum for both)
    sms = _multiprocessors(x.device) if x.is_cuda else 132
    splits = max(1, min(triton.cdiv(T, block_t), triton.cdiv(waves * sms, col_tiles)))
    rows_per_split = triton.cdiv(triton.cdiv(T, splits), block_t) * block_t
    splits = triton.cdiv(T, rows_per_split)
    r_pad, n_pad = _pad(R), _pad(N)
    need_d, has_router = gz is not None, glogits is not None
    part = torch.empty(G, splits, r_pad + n_pad, n, device=x.device, dtype=torch.float32)
    _project_weight_grad_kernel[(col_tiles, splits, G)](
        gz, glogits, x, bits, part, T, n, rows_per_split, 1.0 / (1.0 - p),
        R=R, N=N, R_PAD=r_pad, N_PAD=n_pad, BLOCK_T=block_t, BLOCK_N=block_n,
        HAS_ROUTER=has_router, DROPOUT=bits is not None, CDT=_TL_DTYPES[compute_dtype],
        SPLIT=_TL_DTYPES[split_dtype], X_EXACT=x.dtype == split_dtype, NEED_D=need_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    total = part[:, 0] if splits == 1 else part.sum(1)
    return total[:, :R] if need_d else None, total[:, r_pad:r_pad + N] if has_router else None


# -- expand: the rank-space side of gated_up --------------------------------------------------------------

@triton.jit
def _expanded(z_ptr, c_ptr, rows, row_ok, cols, col_ok, RZ: tl.constexpr, RZ_PAD: tl.constexpr,
              HAS_COEFF: tl.constexpr, CDT: tl.constexpr):
    """u (BLOCK_M, NR_PAD) float32: z C^T (MALoRA's P_t stacked in C), else column c of u is z's c mod RZ
    (MoLoRA: u = z; a down-projection shared by every expert: z repeated once per expert)."""
    if HAS_COEFF:
        kk = tl.arange(0, RZ_PAD)
        z = tl.load(z_ptr + rows[:, None] * RZ + kk[None, :], mask=row_ok[:, None] & (kk < RZ)[None, :], other=0.0)
        ct = tl.load(c_ptr + cols[None, :] * RZ + kk[:, None], mask=col_ok[None, :] & (kk < RZ)[:, None], other=0.0)
        return tl.dot(z.to(CDT), ct.to(CDT))
    return tl.load(z_ptr + rows[:, None] * RZ + (cols % RZ)[None, :], mask=row_ok[:, None] & col_ok[None, :],
                   other=0.0).to(tl.float32)


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
    kk = tl.arange(0, RZ_PAD)
    row_ok = rows < T
    col_ok = cols < NR
    ok = row_ok[:, None] & col_ok[None, :]
    gg = tl.load(gg_ptr + rows[:, None] * NR + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    gates = tl.load(g_ptr + rows[:, None] * N + (cols // RE)[None, :], mask=ok, other=0.0)
    if NEED_GATES:
        prod = gg * _expanded(z_ptr, c_ptr, rows, row_ok, cols, col_ok, RZ, RZ_PAD, HAS_COEFF, CDT)
        expert = cols // RE
        for e in tl.static_range(N):
            tl.store(ggates_ptr + rows * N + e, tl.sum(tl.where((expert == e)[None, :], prod, 0.0), axis=1),
                     mask=row_ok)
    gu = gg * gates  # du: zero past NR
    z_ok = row_ok[:, None] & (kk < RZ)[None, :]
    if HAS_COEFF:
        gu_c = gu.to(CDT)
        if NEED_Z:
            c = tl.load(c_ptr + cols[:, None] * RZ + kk[None, :], mask=col_ok[:, None] & (kk < RZ)[None, :],
                        other=0.0)
            gz = tl.dot(gu_c, c.to(CDT))
            tl.store(gz_ptr + rows[:, None] * RZ + kk[None, :], gz.to(CDT), mask=z_ok)
        if NEED_COEFF:
            z = tl.load(z_ptr + rows[:, None] * RZ + kk[None, :], mask=z_ok, other=0.0)
            part = tl.dot(tl.trans(gu_c), z.to(CDT))
            tl.store(part_ptr + pid * NR_PAD * RZ_PAD + cols[:, None] * RZ_PAD + kk[None, :], part)
    elif NEED_Z:
        if RZ == NR:
            tl.store(gz_ptr + rows[:, None] * RZ + cols[None, :], gu.to(CDT), mask=ok)
        else:  # z feeds every expert: dz sums the experts' du
            fold = ((cols[:, None] % RZ) == kk[None, :]) & col_ok[:, None]
            gz = tl.dot(gu, fold.to(tl.float32), input_precision="ieee")
            tl.store(gz_ptr + rows[:, None] * RZ + kk[None, :], gz.to(CDT), mask=z_ok)


_EXPAND_BLOCK_M = 32


def _expand_shape(z: torch.Tensor, gates: torch.Tensor, width: int) -> dict:
    N = gates.shape[1]
    return dict(RZ=z.shape[1], RE=width // N, N=N, NR=width, RZ_PAD=_pad(z.shape[1]), NR_PAD=_pad(width),
                BLOCK_M=_EXPAND_BLOCK_M, CDT=_TL_DTYPES[z.dtype])


def expand_forward(z: torch.Tensor, coeff: torch.Tensor | None, gates: torch.Tensor, width: int) -> torch.Tensor:
    """gated (T, width) in z's dtype: column c is u[:, c] * gates[:, c // (width / N)], u = z coeff^T with
    ``coeff`` (width, RZ), else z's column c mod RZ (``gates`` (T, N) float32)."""
    T = z.shape[0]
    out = torch.empty(T, width, device=z.device, dtype=z.dtype)
    _expand_fwd_kernel[(triton.cdiv(T, _EXPAND_BLOCK_M),)](
        z, coeff, gates, out, T, HAS_COEFF=coeff is not None, num_warps=4, **_expand_shape(z, gates, width))
    return out


def expand_backward(grad_gated: torch.Tensor, z: torch.Tensor, coeff: torch.Tensor | None, gates: torch.Tensor,
                    need_gates: bool, need_z: bool, need_coeff: bool):
    """(dgates (T, N) float32, dz (T, RZ) z's dtype, dcoeff (width, RZ) float32), each None when not needed."""
    T, width = grad_gated.shape
    shape = _expand_shape(z, gates, width)
    blocks = triton.cdiv(T, _EXPAND_BLOCK_M)
    need_coeff = need_coeff and coeff is not None
    ggates = torch.empty(T, shape["N"], device=z.device, dtype=torch.float32) if need_gates else None
    gz = torch.empty_like(z) if need_z else None
    part = (torch.empty(blocks, shape["NR_PAD"], shape["RZ_PAD"], device=z.device, dtype=torch.float32)
            if need_coeff else None)
    _expand_bwd_kernel[(blocks,)](
        grad_gated, z, coeff, gates, ggates, gz, part, T, HAS_COEFF=coeff is not None, NEED_GATES=need_gates,
        NEED_Z=need_z, NEED_COEFF=need_coeff, num_warps=4, **shape)
    gcoeff = part.sum(0)[:width, :shape["RZ"]] if need_coeff else None
    return ggates, gz, gcoeff


# -- routing --------------------------------------------------------------------------------------------

@triton.jit
def _softmax_rows(logit_ptr, rows, cols, T, N: tl.constexpr):
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
def _row_weights(mask_ptr, rows, T, HAS_MASK: tl.constexpr):
    """Per-token weight of the auxiliary means: the padding mask, 0 past T."""
    row_ok = rows < T
    if HAS_MASK:
        return tl.load(mask_ptr + rows, mask=row_ok, other=0).to(tl.float32)
    return row_ok.to(tl.float32)


@triton.jit
def _route_fwd_kernel(
    logit_ptr, mask_ptr, gates_ptr, idx_ptr, part_ptr,
    T, N: tl.constexpr,
    N_PAD: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, RENORM: tl.constexpr, DENSE: tl.constexpr,
    COLLECT: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, N_PAD)
    row_ok = rows < T
    col_ok = cols < N
    probs, lse = _softmax_rows(logit_ptr, rows, cols, T, N)
    if DENSE:
        selected = (rows >= 0)[:, None] & col_ok[None, :]
        gates = probs
        for k in tl.static_range(K):
            tl.store(idx_ptr + rows * K + k, tl.zeros((BLOCK_T,), tl.int64) + k, mask=row_ok)
    else:
        remaining = tl.where(col_ok[None, :], probs, -1.0)
        chosen = tl.zeros((BLOCK_T, N_PAD), tl.int32)
        for k in tl.static_range(K):
            best = tl.argmax(remaining, axis=1)
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
    tl.store(gates_ptr + rows[:, None] * N + cols[None, :], gates, mask=row_ok[:, None] & col_ok[None, :])
    if COLLECT:
        w = _row_weights(mask_ptr, rows, T, HAS_MASK)
        part = part_ptr + pid * (2 * N_PAD + 3)
        tl.store(part + cols, tl.sum(w[:, None] * selected.to(tl.float32), axis=0))
        tl.store(part + N_PAD + cols, tl.sum(w[:, None] * probs, axis=0))
        tl.store(part + 2 * N_PAD, tl.sum(w * lse * lse, axis=0))
        entropy = -tl.sum(probs * tl.log(tl.maximum(probs, 1e-20)), axis=1)
        tl.store(part + 2 * N_PAD + 1, tl.sum(w * entropy, axis=0))
        tl.store(part + 2 * N_PAD + 2, tl.sum(w, axis=0))


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
    N_PAD: tl.constexpr, K: tl.constexpr, BLOCK_T: tl.constexpr, RENORM: tl.constexpr, DENSE: tl.constexpr,
    HAS_AUX: tl.constexpr, HAS_MASK: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, N_PAD)
    row_ok = rows < T
    col_ok = cols < N
    probs, lse = _softmax_rows(logit_ptr, rows, cols, T, N)
    gg = tl.load(ggates_ptr + rows[:, None] * N + cols[None, :],
                 mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    if DENSE:
        selected = (rows >= 0)[:, None] & col_ok[None, :]
    else:
        chosen = tl.zeros((BLOCK_T, N_PAD), tl.int32)
        for k in tl.static_range(K):
            best = tl.load(idx_ptr + rows * K + k, mask=row_ok, other=-1)
            chosen = tl.where(cols[None, :] == best[:, None], 1, chosen)
        selected = chosen != 0
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
    tl.store(glogit_ptr + rows[:, None] * N + cols[None, :], glogits, mask=row_ok[:, None] & col_ok[None, :])


_ROUTE_BLOCK_T = 64


def _route_shape(logits: torch.Tensor, top_k: int) -> tuple[int, int, bool, int]:
    T, N = logits.shape
    dense = top_k >= N
    return T, N, dense, max(2, triton.next_power_of_2(N))


def route_forward(logits: torch.Tensor, top_k: int, renormalize: bool, mask: torch.Tensor | None,
                  collect: bool):
    """gates (T, N), top_idx (T, K) and, when ``collect``, (balance, z, entropy, stats) 0-d/1-d tensors."""
    T, N, dense, n_pad = _route_shape(logits, top_k)
    K = N if dense else top_k
    gates = torch.empty(T, N, device=logits.device, dtype=torch.float32)
    top_idx = torch.empty(T, K, device=logits.device, dtype=torch.int64)
    blocks = triton.cdiv(T, _ROUTE_BLOCK_T)
    part = torch.empty(blocks, 2 * n_pad + 3, device=logits.device, dtype=torch.float32) if collect else None
    mask_u8 = mask.view(torch.uint8) if mask is not None else None
    _route_fwd_kernel[(blocks,)](
        logits, mask_u8, gates, top_idx, part, T, N,
        N_PAD=n_pad, K=K, BLOCK_T=_ROUTE_BLOCK_T, RENORM=renormalize, DENSE=dense, COLLECT=collect,
        HAS_MASK=mask is not None, num_warps=4,
    )
    if not collect:
        return gates, top_idx, None
    balance, z, entropy = (torch.empty((), device=logits.device, dtype=torch.float32) for _ in range(3))
    stats = torch.empty(1 + n_pad, device=logits.device, dtype=torch.float32)
    _route_stats_kernel[(1,)](part, balance, z, entropy, stats, blocks, N, K, N_PAD=n_pad, BLOCK_P=64,
                              num_warps=4)
    return gates, top_idx, (balance, z, entropy, stats)


def route_backward(logits: torch.Tensor, top_idx: torch.Tensor, mask: torch.Tensor | None,
                   grad_gates: torch.Tensor, stats: torch.Tensor | None, grad_balance: torch.Tensor | None,
                   grad_z: torch.Tensor | None, renormalize: bool) -> torch.Tensor:
    T, N, dense, n_pad = _route_shape(logits, top_idx.shape[1])
    glogits = torch.empty(T, N, device=logits.device, dtype=torch.float32)
    has_aux = stats is not None
    mask_u8 = mask.view(torch.uint8) if mask is not None else None
    _route_bwd_kernel[(triton.cdiv(T, _ROUTE_BLOCK_T),)](
        logits, top_idx, mask_u8, grad_gates, stats, grad_balance if has_aux else None,
        grad_z if has_aux else None, glogits, T, N,
        N_PAD=n_pad, K=top_idx.shape[1], BLOCK_T=_ROUTE_BLOCK_T, RENORM=renormalize, DENSE=dense,
        HAS_AUX=has_aux, HAS_MASK=mask is not None, num_warps=4,
    )
    return glogits
