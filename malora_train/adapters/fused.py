"""The fast adapter path as three custom autograd Functions, each with a hand-written backward:

    project    z = D dropout(x)  [and router logits W_g x in float32]     (full-size input, tiny output)
    gated_up   y = out + s * (gates * expand(z)) B^T                       (tiny input, full-size output)
    route      softmax / top-K / renormalise and the auxiliary-loss statistics

They compute exactly what the reference formulas compute (METHOD.md), but keep from the activations
only what the backward needs: ``x`` itself (already held by the frozen layer, so no extra memory) plus
the dropout mask as one bit per element, or only a seed on the torch path. On CUDA with Triton the
work on full-size tensors runs in the fused kernels of ``triton_kernels``; elsewhere (the CPU, CI) the
same Functions run on plain torch ops, which is what the equation tests check in float64.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F

try:  # Triton ships with CUDA builds of torch; CPU-only installs have none
    from malora_train.adapters import triton_kernels
except ImportError:  # pragma: no cover - depends on the installation
    triton_kernels = None

# True (or MALORA_FUSED=torch) runs the Functions on plain torch ops on CUDA too (benchmarks, debugging)
FORCE_TORCH = os.environ.get("MALORA_FUSED", "") == "torch"
_KERNEL_DTYPES = (torch.bfloat16, torch.float16)


_kernels_failed = False  # set when a Triton kernel could not be built or launched here


def use_triton(t: torch.Tensor) -> bool:
    return triton_kernels is not None and not FORCE_TORCH and not _kernels_failed and t.is_cuda


def _kernel_failure(err: Exception) -> None:
    """Fall back to the torch ops for the rest of the run, once, loudly (a broken Triton install or an
    unsupported GPU must not stop training)."""
    global _kernels_failed
    _kernels_failed = True
    warnings.warn(f"malora_train: Triton adapter kernels failed ({type(err).__name__}: {err}); "
                  "using the plain torch fast path instead", RuntimeWarning, stacklevel=3)


def unpack_keep(bits: torch.Tensor, n: int, p: float) -> torch.Tensor:
    """The scaled keep mask (T, n) from the kernels' packed bits (one int32 word per 32 columns)."""
    shifts = torch.arange(32, device=bits.device, dtype=torch.int32)
    keep = ((bits.unsqueeze(-1) >> shifts) & 1).reshape(bits.shape[0], -1)[:, :n]
    return keep.float().div_(1.0 - p)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the adapter matmuls: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def draw_seed() -> int:
    """A dropout seed from torch's CPU generator: no device sync, reproducible under ``manual_seed``,
    and replayed by activation checkpointing (which restores the CPU RNG state before recomputing)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


_device_seed: torch.Tensor | None = None


@contextlib.contextmanager
def device_dropout_seed(seed: torch.Tensor) -> Iterator[None]:
    """Inside: the dropout kernels read their seed from ``seed`` (a one-element int64 CUDA tensor) when
    they run, plus a salt per layer, instead of taking a number drawn when they are launched. A CUDA
    graph replays its kernels with the arguments of its capture, so a captured step draws new masks
    only this way (the caller writes a new seed before each replay)."""
    global _device_seed
    previous, _device_seed = _device_seed, seed
    try:
        yield
    finally:
        _device_seed = previous


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


def _mm_scaled(a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale * a @ b`` in one GEMM (alpha in the epilogue; beta = 0 never reads the empty input)."""
    return torch.addmm(a.new_empty(a.shape[0], b.shape[1]), a, b, beta=0, alpha=scale)


# -- project: z = D dropout(x), logits = W_g x ------------------------------------------------------------

def member_seed(seed: int, member: int) -> int:
    """The torch path's dropout seed of a group's ``member`` (member 0: the group's own). It moves the low 32
    bits, the only ones the CPU generator reads; the kernels salt member g in Philox's high word instead."""
    return (seed + member * 0x9E3779B9) % 2**63


class _Project(torch.autograd.Function):
    """A group of G layers reading the same x: inputs x, then G down-projections, then G routers (or
    none); outputs the G z's, then the G logits."""

    @staticmethod
    def forward(ctx, x, p, seed, cdt, down_cast, router_stack, has_router, *weights):
        G = len(weights) // (2 if has_router else 1)
        downs, routers = weights[:G], weights[G:]
        if down_cast is not None and down_cast.dtype == cdt:  # ready (working_copies)
            down_c = down_cast
        else:
            down_c = (downs[0].unsqueeze(0) if G == 1 else torch.stack(downs)).to(cdt)  # saved: backward needs it
        router = None
        if has_router:
            router = router_stack if router_stack is not None else (
                routers[0].unsqueeze(0) if G == 1 else torch.stack(routers))
        kernel = use_triton(x) and cdt in _KERNEL_DTYPES and x.is_contiguous()
        if kernel:
            try:
                z, logits, bits = triton_kernels.project_forward(x, down_c, router, p, seed, cdt)
            except Exception as err:  # noqa: BLE001 - any build or launch failure
                _kernel_failure(err)
                kernel = False
        if not kernel:
            if isinstance(seed, tuple):
                raise RuntimeError("a device-side dropout seed (trainer.cuda_graphs) needs the Triton adapter "
                                   "kernels; set adapter.dropout=0 to run without them")
            bits = None
            z, logits = _project_torch(x, down_c, router, p, seed, cdt)
        ctx.save_for_backward(x, down_c, router, bits)
        ctx.p, ctx.seed, ctx.cdt, ctx.down_dtype = p, seed, cdt, downs[0].dtype
        outputs = tuple(z.unbind(0))
        return outputs + tuple(logits.unbind(0)) if has_router else outputs

    @staticmethod
    def backward(ctx, *grads):
        x, down_c, router, bits = ctx.saved_tensors
        p, cdt = ctx.p, ctx.cdt
        G = down_c.shape[0]
        need_x = ctx.needs_input_grad[0]
        need_down = any(ctx.needs_input_grad[_WEIGHTS:_WEIGHTS + G])
        need_router = router is not None and any(ctx.needs_input_grad[_WEIGHTS + G:])
        grad_z = _stacked(grads[:G], x.shape[0], down_c.shape[1], cdt, x.device)
        grad_logits = None
        if router is not None:
            grad_logits = _stacked(grads[G:], x.shape[0], router.shape[1], logits_dtype(x), x.device)
        gx = gdown = grouter = None
        kernel = use_triton(x) and cdt in _KERNEL_DTYPES and x.is_contiguous()
        if kernel:
            try:
                if need_x:
                    gx = triton_kernels.project_input_grad(grad_z, grad_logits, down_c, router, bits, p, x.dtype)
                if need_down or need_router:
                    gdown, grouter = triton_kernels.project_weight_grad(
                        grad_z if need_down else None, grad_logits if need_router else None, x, bits, p,
                        down_c.shape[1], router.shape[1] if router is not None else 1, cdt)
            except Exception as err:  # noqa: BLE001 - any build or launch failure
                _kernel_failure(err)
                kernel = False
        if not kernel:
            gx, gdown, grouter = _project_backward_torch(x, down_c, router, bits, p, ctx.seed, grad_z, grad_logits,
                                                         need_x, need_down, need_router)
        gdowns = [gdown[g].to(ctx.down_dtype) if gdown is not None else None for g in range(G)]
        grouters = [grouter[g] if grouter is not None else None for g in range(G)] if router is not None else []
        return gx, *[None] * (_WEIGHTS - 1), *gdowns, *grouters


_WEIGHTS = 7  # _Project's inputs before the weights: x, p, seed, cdt, down_cast, router_stack, has_router


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
    """The torch path of the group's forward: without dropout one GEMM for every member's z (and one for the
    logits); with it, each member's own mask."""
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
    return z, logits


def _project_backward_torch(x, down_c, router, bits, p, seed, grad_z, grad_logits, need_x, need_down, need_router):
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
        grouter = torch.stack([grad_logits[g].t() @ x.to(grad_logits.dtype) for g in range(G)]).to(router.dtype)
    return gx, gdown, grouter


def project_group(x: torch.Tensor, downs: list[torch.Tensor], routers: list[torch.Tensor] | None, p: float,
                  training: bool, salt: int = 0, down_cast: torch.Tensor | None = None,
                  router_stack: torch.Tensor | None = None) -> list:
    """``project`` for G layers that read the same ``x`` (one kernel launch, or one GEMM on the torch path
    without dropout): member g's z (and logits) as ``project`` gives them, each with its own dropout mask,
    drawn from the group's seed as the layer salted ``salt + g`` draws it. ``down_cast`` (G, R, n) and
    ``router_stack`` (G, N, n): the weights already cast and stacked (``working_copies``); gradients still go
    to ``downs`` and ``routers``."""
    p = p if training else 0.0
    seed: int | tuple[torch.Tensor, int] = 0
    if p > 0:
        seed = draw_seed() if _device_seed is None else (_device_seed, salt << 32)  # Philox's high word
    has_router = routers is not None
    outputs = _Project.apply(x, p, seed, compute_dtype(x), down_cast, router_stack, has_router, *downs,
                             *(routers or ()))
    G = len(downs)
    if not has_router:
        return list(outputs)
    return list(zip(outputs[:G], outputs[G:]))


def project(x: torch.Tensor, down: torch.Tensor, router: torch.Tensor | None, p: float, training: bool,
            salt: int = 0, down_cast: torch.Tensor | None = None):
    """``z = down dropout(x)`` in the compute dtype and, when ``router`` is given, float32 logits
    ``router x`` (the router sees x without dropout). Returns z, or (z, logits) with a router.
    ``salt`` tells layers apart under ``device_dropout_seed`` (each layer's mask its own); ``down_cast``:
    ``down`` already cast (``working_copies``)."""
    return project_group(x, [down], [router] if router is not None else None, p, training, salt,
                         down_cast.unsqueeze(0) if down_cast is not None else None)[0]


# -- gated_up: y = out + s (gates * expand(z)) B^T ------------------------------------------------------------

class _GatedUp(torch.autograd.Function):
    """All tensors are in the compute dtype (z's) by construction: no autocast needed here. With gates, on
    CUDA, the rank-space side (expand, gate; and its backward) runs in ``triton_kernels.expand_*``."""

    @staticmethod
    def forward(ctx, z, out, up, gates, coeff, scaling, num_experts, shared, up_cast, coeff_cast):
        cdt = z.dtype
        coeff_c = _ready(coeff_cast, cdt, coeff)
        up_c = _ready(up_cast, cdt, up)
        u, gated = None, None
        kernel = gates is not None and use_triton(z) and cdt in _KERNEL_DTYPES and z.shape[0] > 0
        if kernel:  # the kernels read every tensor as contiguous rows
            gates = gates.contiguous()
            coeff_c = coeff_c.contiguous() if coeff_c is not None else None
            try:
                gated = triton_kernels.expand_forward(z.contiguous(), coeff_c, gates, up.shape[1])
            except Exception as err:  # noqa: BLE001 - any build or launch failure
                _kernel_failure(err)
                kernel = False
        if not kernel:  # the torch ops gate in z's dtype
            gates = gates.to(cdt) if gates is not None else None
            u, gated = _expand_torch(z, gates, coeff_c, num_experts, shared)
        if out.dtype == cdt:
            y = torch.addmm(out, gated, up_c.t(), alpha=scaling)
        else:
            y = out + _mm_scaled(gated, up_c.t(), scaling).to(out.dtype)
        ctx.save_for_backward(z, u if coeff is not None else None, gated, up_c, gates, coeff_c)
        ctx.scaling, ctx.num_experts, ctx.shared, ctx.kernel = scaling, num_experts, shared, kernel
        ctx.dtypes = (up.dtype, gates.dtype if gates is not None else None,
                      coeff.dtype if coeff is not None else None)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        z, u, gated, up_c, gates_c, coeff_c = ctx.saved_tensors
        s = ctx.scaling
        up_dtype, gates_dtype, coeff_dtype = ctx.dtypes
        need_z, need_out, need_up, need_gates, need_coeff = ctx.needs_input_grad[:5]
        cdt = z.dtype
        gup = None
        grad_c = grad_y.to(cdt)
        if need_up:
            gup = _mm_scaled(grad_c.t(), gated, s).to(up_dtype)
        g_gated = _mm_scaled(grad_c, up_c, s)
        grads = None
        if ctx.kernel:
            try:
                grads = triton_kernels.expand_backward(g_gated, z.contiguous(), coeff_c, gates_c, need_gates,
                                                       need_z, need_coeff)
            except Exception as err:  # noqa: BLE001 - any build or launch failure: the torch ops instead
                _kernel_failure(err)
                u, _ = _expand_torch(z, None, coeff_c, ctx.num_experts, ctx.shared)
                gates_c = gates_c.to(cdt)
        if grads is None:
            grads = _expand_backward_torch(g_gated, z, u, gates_c, coeff_c, ctx.num_experts, ctx.shared,
                                           need_gates, need_z, need_coeff, gates_dtype)
        ggates, gz, gcoeff = grads
        ggates = ggates.to(gates_dtype) if ggates is not None else None
        gcoeff = gcoeff.to(coeff_dtype) if gcoeff is not None else None
        return gz, grad_y if need_out else None, gup, ggates, gcoeff, None, None, None, None, None


def _expand_torch(z, gates_c, coeff_c, num_experts, shared):
    """(u, gated): u = z coeff^T (or z), gated = gates * u expanded per expert (``gates_c`` in z's dtype); the
    reference of ``triton_kernels.expand_forward``."""
    T = z.shape[0]
    u = z @ coeff_c.t() if coeff_c is not None else z
    if gates_c is None:
        return u, u
    u3 = u.unsqueeze(1) if shared else u.view(T, num_experts, -1)
    return u, (u3 * gates_c.unsqueeze(-1)).reshape(T, -1)


def _expand_backward_torch(g_gated, z, u, gates_c, coeff_c, num_experts, shared, need_gates, need_z, need_coeff,
                           gates_dtype):
    """(dgates, dz, dcoeff) from dgated; the reference of ``triton_kernels.expand_backward``."""
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


def _ready(cast: torch.Tensor | None, dtype: torch.dtype, weight: torch.Tensor | None) -> torch.Tensor | None:
    """``weight`` in ``dtype``: its ready cast (``working_copies``) when there is one, else cast now."""
    if weight is None:
        return None
    return cast if cast is not None and cast.dtype == dtype else weight.to(dtype)


def gated_up(z: torch.Tensor, out: torch.Tensor, up: torch.Tensor, scaling: float,
             gates: torch.Tensor | None = None, coeff: torch.Tensor | None = None, num_experts: int = 1,
             shared: bool = False, up_cast: torch.Tensor | None = None,
             coeff_cast: torch.Tensor | None = None) -> torch.Tensor:
    """``out + scaling * (gates * u) up^T`` where ``u = z coeff^T`` (MALoRA), ``z`` for every expert
    (``shared``, HydraLoRA) or ``z`` itself split into ``num_experts`` blocks; no gates: plain LoRA.
    ``up_cast``/``coeff_cast``: those weights already in z's dtype (``working_copies``)."""
    return _GatedUp.apply(z, out, up, gates, coeff, scaling, num_experts, shared, up_cast, coeff_cast)


# -- route: top-K routing and its auxiliary statistics ----------------------------------------------------

class _Route(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, mask, top_k, renormalize, collect):
        gates, top_idx, aux = triton_kernels.route_forward(logits, top_k, renormalize, mask, collect)
        # Activation checkpointing recomputes with collect off and matches saved tensors by position,
        # so the tiny statistics ride on ctx instead of save_for_backward.
        ctx.save_for_backward(logits, top_idx, mask)
        ctx.stats = aux[3] if aux is not None else None
        ctx.top_k, ctx.renormalize = top_k, renormalize
        ctx.mark_non_differentiable(top_idx)
        if aux is None:
            return gates, top_idx
        balance, z, entropy, _ = aux
        ctx.mark_non_differentiable(entropy)
        return gates, top_idx, balance, z, entropy

    @staticmethod
    def backward(ctx, grad_gates, _grad_idx, grad_balance=None, grad_z=None, _grad_entropy=None):
        logits, top_idx, mask = ctx.saved_tensors
        try:
            glogits = triton_kernels.route_backward(logits, top_idx, mask, grad_gates.contiguous(), ctx.stats,
                                                    grad_balance, grad_z, ctx.renormalize)
        except Exception as err:  # noqa: BLE001 - any build or launch failure: redo it with autograd
            _kernel_failure(err)
            glogits = _route_backward_autograd(logits, mask, ctx, grad_gates, grad_balance, grad_z)
        return glogits, None, None, None, None


def _route_backward_autograd(logits, mask, ctx, grad_gates, grad_balance, grad_z) -> torch.Tensor:
    from malora_train.adapters.router import balance_loss, top_k_route, z_loss

    with torch.enable_grad():
        leaf = logits.detach().requires_grad_()
        routing = top_k_route(leaf, ctx.top_k, ctx.renormalize)
        total = (routing.gates * grad_gates).sum()
        if ctx.stats is not None:
            total = total + grad_balance * balance_loss(routing, mask)
            total = total + grad_z * z_loss(routing, mask)
        return torch.autograd.grad(total, leaf)[0]


def route(logits: torch.Tensor, top_k: int, renormalize: bool, mask: torch.Tensor | None, collect: bool):
    """(gates (T, N), top_idx (T, K), aux) from float32 logits in fused kernels; ``aux`` is {balance, z,
    entropy} as ``router`` computes them when ``collect``, else None. None where the kernels do not
    run (the CPU, no Triton, a failure): the caller then routes with ``router.top_k_route``."""
    if not use_triton(logits):
        return None
    try:
        outputs = _Route.apply(logits.contiguous(), mask, top_k, renormalize, collect)
    except Exception as err:  # noqa: BLE001 - any build or launch failure
        _kernel_failure(err)
        return None
    if not collect:
        return outputs[0], outputs[1], None
    gates, top_idx, balance, z, entropy = outputs
    return gates, top_idx, {"balance": balance, "z": z, "entropy": entropy}
