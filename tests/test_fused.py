"""The fast path's custom autograd Functions (malora_train/adapters/kernels/): with dropout on they
equal the reference formulas with the same mask, they keep no full-size copy of the input for backward,
and (on CUDA) the Triton kernels match plain torch."""

from __future__ import annotations

import warnings

import pytest
import torch
from adapter_specs import kind_config
from torch import nn

from malora_train.adapters import ADAPTER_CLASSES, AdaptedCausalLM, adapter_kinds, adapter_layers
from malora_train.adapters.base import MixtureAdapterLinear, RoutingContext
from malora_train.adapters.kernels import common, gated_up, projection, routed_gated_up, routing
from malora_train.adapters.kernels.common import KernelState
from malora_train.adapters.router import balance_loss, entropy, top_k_route, z_loss
from malora_train.config import RouterConfig

KINDS = adapter_kinds()
T, IN, OUT = 23, 40, 36


def build(kind: str, dropout: float, dtype=torch.float64, device="cpu", context=None):
    cfg = kind_config(kind, rank=6 if kind == "lora" else 4, num_experts=5, dropout=dropout,
                      shared_rank=8 if kind == "malora" else None,
                      expert_rank=5 if kind == "malora" else None,
                      router=RouterConfig(top_k=2, dense=kind == "hydralora"))
    kwargs = {}
    if issubclass(ADAPTER_CLASSES[kind], MixtureAdapterLinear):
        kwargs["context"] = context
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, dtype=dtype, device=device).requires_grad_(False)
    layer = ADAPTER_CLASSES[kind](base, cfg, **kwargs).to(dtype)
    with torch.no_grad():
        for name in layer.tensor_kinds:
            getattr(layer, name).normal_(0.0, 0.3)
    return layer.train()


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_with_dropout_equals_the_reference_with_the_same_mask(kind: str, monkeypatch) -> None:
    """The backward regenerates the mask from the forward's seed; outputs, every gradient and the aux
    losses must equal the reference path fed the very same mask (float64, so exactly)."""
    context = RoutingContext()
    layer = build(kind, dropout=0.3, context=context)
    x = torch.randn(T, IN, dtype=torch.float64, requires_grad=True)
    monkeypatch.setattr(common, "draw_seed", lambda: 1234)
    mask = projection._keep_mask(x.detach(), 0.3, 1234)
    assert 0.5 < (mask > 0).double().mean() < 0.9  # a real mask, scaled by 1 / (1 - p)
    assert torch.allclose(mask[mask > 0], torch.tensor(1 / 0.7, dtype=torch.float64))
    weights = torch.randn(T, OUT, dtype=torch.float64)
    results = {}
    for impl in ("fast", "reference"):
        layer.impl = impl
        if impl == "reference":
            monkeypatch.setattr(layer, "dropout", lambda t: t * mask)
        context.collect = True
        context.token_mask = torch.arange(T) % 4 != 0
        y = layer(x)
        aux = getattr(layer, "aux", {})
        loss = (y * weights).sum() + sum(0.5 * v for k, v in aux.items() if k != "entropy")
        params = [p for p in layer.parameters() if p.requires_grad]
        results[impl] = [y, *torch.autograd.grad(loss, [x, *params]), *aux.values()]
    for fast, reference in zip(results["fast"], results["reference"], strict=True):
        torch.testing.assert_close(fast, reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_keeps_no_full_size_copy_of_the_input(kind: str) -> None:
    """A dropout copy of x per adapted layer would be most of the adapters' memory: the fast path may
    save x itself (the frozen layer holds it anyway) and small tensors, nothing else of x's size."""
    layer = build(kind, dropout=0.05, dtype=torch.float32)
    x = torch.randn(64, IN, requires_grad=True)
    saved = []

    def pack(t: torch.Tensor):
        saved.append(t)
        return t

    for impl, expect_copy in (("fast", False), ("reference", True)):
        layer.impl = impl
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x)
        big = [t for t in saved if t.numel() >= x.numel() and t.untyped_storage().data_ptr()
               != x.untyped_storage().data_ptr()]
        assert bool(big) == expect_copy, (impl, [tuple(t.shape) for t in big])


# -- CUDA: the Triton kernels against plain torch --------------------------------------------------------

def test_a_failing_kernel_warns_once_and_the_torch_path_takes_over() -> None:
    state = KernelState()

    def broken():
        raise RuntimeError("no kernel here")

    with pytest.warns(RuntimeWarning, match=r"kernels failed \(RuntimeError: no kernel here\)"):
        assert state.run(True, broken, lambda: "torch") == "torch"
    assert state.kernels_failed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert state.run(True, broken, lambda: "torch again") == "torch again"
    assert state.run(False, broken, lambda: "not tried") == "not tried"


def test_a_failing_kernel_family_turns_off_only_itself() -> None:
    state = KernelState()

    def broken():
        raise RuntimeError("no fused kernel")

    with pytest.warns(RuntimeWarning, match=r"the fam kernels failed .*; using what stands in for them"):
        assert state.run(True, broken, lambda: "two-step", family="fam") == "two-step"
    assert not state.kernels_failed and state.failed_families == {"fam"}
    assert state.run(True, lambda: "kernel", lambda: "torch") == "kernel"


def test_a_failing_routed_gated_up_leaves_the_two_step_kernels_on(monkeypatch) -> None:
    """Routing and gating in one Function is a shortcut the two-step kernels can take over: its failure
    (say, a kernel that does not build on some GPU) turns off that Function alone, never the projection
    kernels a captured step's dropout depends on."""
    state = KernelState()

    def broken(*args, **kwargs):
        raise RuntimeError("no routed kernel")

    monkeypatch.setattr(routed_gated_up, "_expand_kernels_run",
                        lambda state, z, family=None: family not in state.failed_families)
    monkeypatch.setattr(routed_gated_up, "routed_expand_kernel", broken, raising=False)
    spec = routed_gated_up.RoutedUpSpec(1.0, 4, False, 2, True, collect=True)
    args = (torch.randn(6, 8).bfloat16(), torch.randn(6, 4), None, torch.randn(6, 3).bfloat16(),
            torch.randn(3, 8), spec)
    with pytest.warns(RuntimeWarning, match="routed gated up-projection kernels failed"):
        assert routed_gated_up.routed_gated_up(*args, state=state) is None
    assert not state.kernels_failed and state.failed_families == {routed_gated_up.FAMILY}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not tried again
        assert routed_gated_up.routed_gated_up(*args, state=state) is None


def test_kernel_state_seeds_and_switch(monkeypatch) -> None:
    """A dropout seed is drawn on the host, or under ``device_seed`` is the seed tensor with the layer's salt
    in the high word, which the torch path cannot read; ``MALORA_FUSED=torch`` forces the torch path."""
    monkeypatch.setenv("MALORA_FUSED", "torch")
    assert KernelState().force_torch
    monkeypatch.delenv("MALORA_FUSED")
    state = KernelState()
    assert not state.force_torch
    monkeypatch.setattr(common, "draw_seed", lambda: 5)
    seed = torch.zeros(1, dtype=torch.int64)
    with state.device_seed(seed):
        assert state.dropout_seed(3) == (seed, 3 << 32)
        with pytest.raises(RuntimeError, match="needs the Triton adapter kernels"):
            projection.project(torch.randn(4, 8), torch.randn(2, 8), None, 0.5, True, state=state)
    assert state.dropout_seed(3) == 5


def test_kernel_state_makes_each_zero_once_per_device_and_dtype() -> None:
    state = KernelState()
    a, b = torch.ones(3), torch.ones(2, dtype=torch.float64)
    zero = state.zero(a)
    assert zero.shape == () and zero.dtype == torch.float32 and zero.item() == 0
    assert state.zero(torch.randn(5)) is zero
    assert state.zero(b) is not zero and state.zero(b).dtype == torch.float64


def test_every_adapted_layer_runs_with_its_models_kernel_state(make_tiny_model) -> None:
    model = AdaptedCausalLM.from_base(make_tiny_model(), kind_config("malora"))
    layers = [layer for _, layer in adapter_layers(model)]
    assert layers and all(layer.kernel_state is model.kernel_state for layer in layers)


ROUTED_CASES = [  # N, RE, RZ, coeff, shared, top_k, renormalize, masked: MALoRA, MoLoRA, HydraLoRA (dense)
    (8, 12, 32, True, False, 2, True, True), (8, 8, 64, False, False, 2, True, False),
    (5, 3, 7, True, False, 3, False, True), (4, 6, 6, False, True, 4, True, False)]


def _two_step(z, logits, out, up, c, mask, spec, weights, aux_weights):
    """The loss of routing then gating in plain torch (float64 in, autograd through ``router``)."""
    routing_ = top_k_route(logits, spec.top_k, spec.renormalize)
    u = z @ c.t() if c is not None else (z.repeat(1, spec.num_experts) if spec.shared else z)
    gated = (u.view(z.shape[0], spec.num_experts, -1) * routing_.gates.unsqueeze(-1)).reshape(z.shape[0], -1)
    y = out + spec.scaling * gated @ up.t()
    return ((y * weights).sum() + aux_weights[0] * balance_loss(routing_, mask)
            + aux_weights[1] * z_loss(routing_, mask))


@pytest.mark.parametrize("N,RE,RZ,coeff,shared,top_k,renormalize,masked", ROUTED_CASES)
def test_routed_gated_up_backward_stand_in_matches_autograd(N, RE, RZ, coeff, shared, top_k, renormalize,
                                                            masked) -> None:
    """Where the fused backward kernel fails, ``_backward_torch`` stands in: dlogits, dz and dC from dgated
    (and the auxiliary losses' gradients) as autograd gives them, in float64."""
    gen = torch.Generator().manual_seed(4)
    T_ = 37
    z = torch.randn(T_, RZ, dtype=torch.float64, generator=gen, requires_grad=True)
    logits = (torch.randn(T_, N, dtype=torch.float64, generator=gen) * 2).requires_grad_()
    c = torch.randn(N * RE, RZ, dtype=torch.float64, generator=gen) * RZ**-0.5 if coeff else None
    c = c.requires_grad_() if coeff else None
    up = torch.randn(9, N * RE, dtype=torch.float64, generator=gen)
    mask = torch.rand(T_, generator=gen) > 0.3 if masked else None
    spec = routed_gated_up.RoutedUpSpec(0.7, N, shared, top_k, renormalize, collect=True)
    weights = torch.randn(T_, 9, dtype=torch.float64, generator=gen)
    inputs = [logits, z] + ([c] if coeff else [])
    zeros = torch.zeros(T_, 9, dtype=torch.float64)
    want = torch.autograd.grad(_two_step(z, logits, zeros, up, c, mask, spec, weights, (0.3, 0.2)), inputs)
    g_gated = spec.scaling * weights @ up
    stats = torch.ones(1)  # read only for being there: the auxiliary losses reach the logits
    got = routed_gated_up._backward_torch(g_gated, z.detach(), c.detach() if coeff else None, logits.detach(),
                                          mask, stats, torch.tensor(0.3, dtype=torch.float64),
                                          torch.tensor(0.2, dtype=torch.float64), spec, True, True, coeff)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert (got[2] is None) == (not coeff)


def test_routed_gated_up_leaves_the_cpu_to_the_two_step_path() -> None:
    """No kernels on the CPU: ``routed_gated_up`` answers None and the layer routes, then gates."""
    spec = routed_gated_up.RoutedUpSpec(1.0, 4, False, 2, True, collect=True)
    z = torch.randn(6, 8).bfloat16()
    assert routed_gated_up.routed_gated_up(z, torch.randn(6, 4), None, torch.randn(6, 3).bfloat16(),
                                           torch.randn(3, 8), spec, state=KernelState()) is None


# -- CUDA: the Triton kernels against plain torch --------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available() or projection.triton is None,
                          reason="needs CUDA and Triton")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _unpack(bits: torch.Tensor, n: int) -> torch.Tensor:
    shifts = torch.arange(projection.MASK_BITS, device=bits.device, dtype=torch.int32)
    return ((bits[:, :, None] >> shifts) & 1).reshape(bits.shape[0], -1)[:, :n].bool()


@cuda
@pytest.mark.parametrize("T_,n,R,N,p,G", [(4096, 4096, 64, 8, 0.05, 1), (1000, 11008, 32, 8, 0.05, 1),
                                          (77, 300, 8, 5, 0.2, 1), (130, 256, 96, 0, 0.0, 1),
                                          (1000, 576, 32, 8, 0.05, 3), (300, 576, 64, 0, 0.1, 2)])
def test_triton_projection_matches_torch(T_: int, n: int, R: int, N: int, p: float, G: int) -> None:
    """The three projection kernels for a group of G layers reading x: each member's z, logits and
    weight gradients, and dx summed over the members; member g's mask is the one a lone layer salted
    g draws (the group adds g in Philox's high word)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(T_, n, device="cuda", generator=gen).bfloat16()
    down = torch.randn(G, R, n, device="cuda", generator=gen) * n**-0.5
    router = torch.randn(G, N, n, device="cuda", generator=gen) * 0.02 if N else None
    z, logits, bits = projection.project_forward(x, down, router, p, 99, torch.bfloat16)
    gz = torch.randn(G, T_, R, device="cuda", generator=gen).bfloat16()
    gl = torch.randn(G, T_, N, device="cuda", generator=gen) * 1e-3 if N else None
    gx = projection.project_input_grad(gz, gl, down, router, bits, p, torch.bfloat16)
    gd, gw = projection.project_weight_grad(gz, gl, x, bits, p, R, max(N, 1), torch.bfloat16)
    gx_ref = torch.zeros(T_, n, device="cuda")
    for g in range(G):
        keep = _unpack(bits[g], n) if p > 0 else torch.ones_like(x, dtype=torch.bool)
        assert abs(keep.float().mean().item() - (1 - p)) < 0.02
        if p > 0:
            lone = projection.project_forward(x, down[g:g + 1].contiguous(), None, p, 99 + (g << 32),
                                              torch.bfloat16)[2]
            assert torch.equal(lone[0], bits[g])
            assert g == 0 or not torch.equal(bits[g], bits[0])
        xd = torch.where(keep, x.float() / (1 - p), 0.0).bfloat16()
        assert _rel(z[g], xd.float() @ down[g].bfloat16().float().t()) < 1e-2
        if router is not None:
            # tensor-core float32 accumulation
            assert _rel(logits[g], x.double() @ router[g].double().t()) < 5e-5
        gx_ref += torch.where(keep, (gz[g].float() @ down[g].bfloat16().float()) / (1 - p), 0.0)
        if router is not None:
            gx_ref += gl[g] @ router[g]
        assert _rel(gd[g], gz[g].float().t() @ xd.float()) < 1e-3
        if router is not None:
            assert _rel(gw[g], gl[g].double().t() @ x.double()) < 5e-5
    assert _rel(gx, gx_ref) < 1e-2


@cuda
@pytest.mark.parametrize("N,RE,RZ,coeff,shared", [(8, 12, 32, True, False), (8, 8, 64, False, False),
                                                  (8, 13, 13, False, True), (8, 8, 22, True, False),
                                                  (5, 3, 7, True, False)])
def test_triton_expand_matches_float64(N: int, RE: int, RZ: int, coeff: bool, shared: bool) -> None:
    """gated = gates * expand(z) and its backward (dgates, dz, dC) for MALoRA (z C^T), MoLoRA (z) and a
    down-projection shared by the experts (HydraLoRA: z once per expert), against float64 arithmetic."""
    gen = torch.Generator(device="cuda").manual_seed(2)
    T_, NR = 3001, N * RE
    z = torch.randn(T_, RZ, device="cuda", generator=gen).bfloat16()
    c = (torch.randn(NR, RZ, device="cuda", generator=gen) * RZ**-0.5).bfloat16() if coeff else None
    gates = torch.softmax(torch.randn(T_, N, device="cuda", generator=gen), -1)
    gates = gates * (torch.rand(T_, N, device="cuda", generator=gen) > 0.5)
    gated = gated_up.expand_forward(z, c, gates, NR)
    u = z.double() @ c.double().t() if coeff else (z.double().repeat(1, N) if shared else z.double())
    assert _rel(gated, (u.view(T_, N, RE) * gates.double().unsqueeze(-1)).reshape(T_, NR)) < 1e-2
    gg = torch.randn(T_, NR, device="cuda", generator=gen).bfloat16()
    ggates, gz, gc = gated_up.expand_backward(gg, z, c, gates, True, True, True)
    assert _rel(ggates, (gg.double().view(T_, N, RE) * u.view(T_, N, RE)).sum(-1)) < 1e-5
    gu = (gg.double().view(T_, N, RE) * gates.double().unsqueeze(-1)).reshape(T_, NR)
    if coeff:
        assert _rel(gz, gu @ c.double()) < 1e-2
        assert _rel(gc, gu.t() @ z.double()) < 1e-2
    else:
        assert gc is None
        assert _rel(gz, gu.view(T_, N, RE).sum(1) if shared else gu) < 1e-2


@cuda
@pytest.mark.parametrize("top_k,renormalize,masked", [(2, True, True), (8, True, False), (3, False, False)])
@pytest.mark.parametrize("aux_weights", [(0.3, 0.2), (0.3, 0.0), (0.0, 0.0)])
def test_triton_routing_matches_torch_autograd(top_k: int, renormalize: bool, masked: bool,
                                               aux_weights: tuple[float, float]) -> None:
    """Forward and backward against autograd through ``router``. An auxiliary loss the loss leaves out (a zero
    weight) reaches the backward as None, not zeros, and must count as zero."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    logits = (torch.randn(3000, 8, device="cuda", generator=gen) * 2).requires_grad_()
    mask = torch.rand(3000, device="cuda", generator=gen) > 0.3 if masked else None
    gates, top_idx, aux = routing.route(logits, top_k, renormalize, mask, collect=True, state=KernelState())
    ref = top_k_route(logits, top_k, renormalize)
    assert torch.equal(top_idx.sort(1).values, ref.top_idx.sort(1).values)
    expected_aux = [balance_loss(ref, mask), z_loss(ref, mask), entropy(ref, mask)]
    for got, want in zip(aux.values(), expected_aux):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gates, ref.gates, rtol=1e-5, atol=1e-6)
    weights = torch.randn(3000, 8, device="cuda", generator=gen)

    def loss(gates, balance, z):
        total = (gates * weights).sum()
        for weight, term in zip(aux_weights, (balance, z)):
            total = total + weight * term if weight else total
        return total

    got = torch.autograd.grad(loss(gates, aux["balance"], aux["z"]), logits)[0]
    want = torch.autograd.grad(loss(ref.gates, *expected_aux[:2]), logits)[0]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


@cuda
@pytest.mark.parametrize("kind", KINDS)
def test_fast_layer_matches_the_reference_under_bf16_autocast(kind: str) -> None:
    layer = build(kind, dropout=0.0, dtype=torch.float32, device="cuda")
    layer.base.to(torch.bfloat16)
    x = torch.randn(2048, IN, device="cuda").bfloat16().requires_grad_()
    results = {}
    for impl in ("fast", "reference"):
        layer.impl = impl
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        params = [p for p in layer.parameters() if p.requires_grad]
        results[impl] = [y, *torch.autograd.grad(y.float().square().sum(), [x, *params])]
    for fast, reference in zip(results["fast"], results["reference"], strict=True):
        assert _rel(fast, reference) < 2e-2


@cuda
@pytest.mark.parametrize("N,RE,RZ,coeff,top_k,renormalize", [
    (8, 12, 32, True, 2, True), (8, 8, 64, False, 2, True), (8, 13, 13, False, 8, True),
    (5, 3, 7, True, 3, False)])
def test_triton_routed_expand_equals_routing_then_expand(N: int, RE: int, RZ: int, coeff: bool, top_k: int,
                                                         renormalize: bool) -> None:
    """The inference kernel routes inside the expand kernel: bit for bit what the routing kernel's gates give
    the expand kernel (MALoRA with C, MoLoRA, HydraLoRA's dense routing; a few tokens, as in decoding, and
    many)."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    for T_ in (8, 3001):
        z = torch.randn(T_, RZ, device="cuda", generator=gen).bfloat16()
        c = (torch.randn(N * RE, RZ, device="cuda", generator=gen) * RZ**-0.5).bfloat16() if coeff else None
        logits = torch.randn(T_, N, device="cuda", generator=gen) * 2
        gates, _, _ = routing.route_forward(logits, top_k, renormalize, None, collect=False)
        expected = gated_up.expand_forward(z, c, gates, N * RE)
        assert torch.equal(gated_up.routed_expand(z, c, logits, N * RE, top_k, renormalize), expected)


@cuda
@pytest.mark.parametrize("kind", [k for k in KINDS if issubclass(ADAPTER_CLASSES[k], MixtureAdapterLinear)])
def test_mixture_layer_without_grad_routes_in_one_kernel_and_gives_the_same_output(kind: str,
                                                                                  monkeypatch) -> None:
    """Under no_grad (evaluation, generation) a mixture layer routes and gates in one launch
    (``gated_up.routed_up``), with the output of the training path to the bit; with grad, or with routing
    counts asked for, it takes the training path."""
    context = RoutingContext()
    layer = build(kind, dropout=0.0, dtype=torch.float32, device="cuda", context=context).eval()
    layer.base.to(torch.bfloat16)
    calls = []
    original = gated_up.routed_up
    monkeypatch.setattr("malora_train.adapters.base.routed_up",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    for tokens in (8, 2048):
        x = torch.randn(tokens, IN, device="cuda").bfloat16()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            trained_path = layer(x).detach()
            assert not calls
            with torch.no_grad():
                inference = layer(x)
            assert len(calls) == 1
            context.token_task, context.num_tasks = torch.zeros(tokens, dtype=torch.long, device="cuda"), 1
            with torch.no_grad():
                counted = layer(x)
            context.token_task = None
            assert len(calls) == 1 and layer.task_expert_counts.sum() > 0
        calls.clear()
        assert torch.equal(inference, trained_path)
        assert torch.equal(counted, trained_path)


@cuda
@pytest.mark.parametrize("N,RE,RZ,coeff,shared,top_k,renormalize,masked", ROUTED_CASES)
@pytest.mark.parametrize("aux_weights", [(0.3, 0.2), (0.3, 0.0), (0.0, 0.0)])
def test_triton_routed_gated_up_matches_float64_autograd(N, RE, RZ, coeff, shared, top_k, renormalize, masked,
                                                        aux_weights) -> None:
    """Training's one-Function routing and gating (two fused kernels and the statistics): y, the auxiliary
    losses and every gradient against autograd through ``router`` in float64, on the same bf16 inputs; the
    chosen experts are the two-step kernels' own. An auxiliary loss the loss leaves out reaches the backward
    as None and must count as zero."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    T_, OUT_ = 3001, 96
    z = torch.randn(T_, RZ, device="cuda", generator=gen).bfloat16().requires_grad_()
    logits = (torch.randn(T_, N, device="cuda", generator=gen) * 2).requires_grad_()
    out = torch.randn(T_, OUT_, device="cuda", generator=gen).bfloat16().requires_grad_()
    up = (torch.randn(OUT_, N * RE, device="cuda", generator=gen) * 0.3).requires_grad_()
    c = torch.randn(N * RE, RZ, device="cuda", generator=gen) * RZ**-0.5 if coeff else None
    c = c.requires_grad_() if coeff else None
    mask = torch.rand(T_, device="cuda", generator=gen) > 0.3 if masked else None
    weights = torch.randn(T_, OUT_, device="cuda", generator=gen)
    spec = routed_gated_up.RoutedUpSpec(0.7, N, shared, top_k, renormalize, collect=True)
    y, aux = routed_gated_up.routed_gated_up(z, logits, mask, out, up, spec, coeff=c, state=KernelState())
    loss = (y.float() * weights).sum()
    for weight, term in zip(aux_weights, (aux["balance"], aux["z"])):
        loss = loss + weight * term if weight else loss
    inputs = [z, logits, out, up] + ([c] if coeff else [])
    got = torch.autograd.grad(loss, inputs)
    # the reference: float64 from the same values, with C rounded to bf16 as the kernels read it
    ref_inputs = [t.detach().double().requires_grad_() for t in inputs]
    rz, rlogits, rout, rup, *rc = ref_inputs
    c_seen = rc[0].bfloat16().double() if coeff else None
    want_y = None

    def reference_loss():
        nonlocal want_y
        routing_ = top_k_route(rlogits, top_k, renormalize)
        u = rz @ c_seen.t() if coeff else (rz.repeat(1, N) if shared else rz)
        gated = (u.view(T_, N, RE) * routing_.gates.unsqueeze(-1)).reshape(T_, -1)
        want_y = rout + 0.7 * gated @ rup.t()
        total = (want_y * weights.double()).sum()
        aux_terms = (balance_loss(routing_, mask), z_loss(routing_, mask))
        for weight, term in zip(aux_weights, aux_terms):
            total = total + weight * term if weight else total
        return total, routing_

    total, routing_ = reference_loss()
    want = torch.autograd.grad(total, ref_inputs)  # dC through C's bf16 rounding, as the kernels read it
    assert _rel(y, want_y) < 1e-2
    torch.testing.assert_close(aux["balance"].double(), balance_loss(routing_, mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["z"].double(), z_loss(routing_, mask), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux["entropy"].double(), entropy(routing_, mask), rtol=1e-5, atol=1e-6)
    for name, g, w in zip(("z", "logits", "out", "up", "coeff"), got, want):
        assert _rel(g, w) < 2e-2, name


@cuda
@pytest.mark.parametrize("kind", [k for k in KINDS if issubclass(ADAPTER_CLASSES[k], MixtureAdapterLinear)])
def test_mixture_layer_in_training_routes_and_gates_in_one_function(kind: str, monkeypatch) -> None:
    """With grad a mixture layer routes and gates through ``routed_gated_up`` (one Function), with the output,
    auxiliary losses and gradients of the two-step path (``fast_route``, then ``gated_up``); with routing
    counts per task asked for, it takes the two-step path, which records them."""
    context = RoutingContext()
    layer = build(kind, dropout=0.0, dtype=torch.float32, device="cuda", context=context)
    layer.base.to(torch.bfloat16)
    x = torch.randn(2048, IN, device="cuda").bfloat16().requires_grad_()
    context.token_mask = torch.arange(2048, device="cuda") % 5 != 0
    calls = []
    original = routed_gated_up.routed_gated_up
    monkeypatch.setattr("malora_train.adapters.base.routed_gated_up",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    results = {}
    for path in ("fused", "two-step"):
        if path == "two-step":
            context.token_task, context.num_tasks = torch.zeros(2048, dtype=torch.long, device="cuda"), 1
        context.collect = True
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = layer(x)
        aux = dict(layer.aux)
        loss = y.float().square().sum() + 0.5 * aux["balance"] + 0.1 * aux["z"]
        params = [p for p in layer.parameters() if p.requires_grad]
        grads = torch.autograd.grad(loss, [x, *params])
        results[path] = [y, aux["balance"], aux["z"], aux["entropy"], *grads]
        assert len(calls) == 1  # the fused path once, never the two-step one
    assert layer.task_expert_counts.sum() > 0
    for fused, two_step in zip(results["fused"], results["two-step"], strict=True):
        assert _rel(fused, two_step) < 1e-2


def test_weight_grad_casts_the_gemm_off_cuda_or_where_the_float32_output_fails(monkeypatch) -> None:
    a, b = torch.randn(7, 30).bfloat16(), torch.randn(30, 5).bfloat16()
    state = KernelState()
    got = gated_up.weight_grad(a, b, 0.5, torch.float32, state)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (0.5 * a @ b).float())
    # a torch whose addmm has no float32 output (the CPU's has none): one warning, then the cast
    monkeypatch.setattr(KernelState, "kernels_allowed", lambda self, t, family=None: family not in
                        self.failed_families)
    with pytest.warns(RuntimeWarning, match="float32-output GEMM kernels failed"):
        torch.testing.assert_close(gated_up.weight_grad(a, b, 0.5, torch.float32, state), got)
    assert state.failed_families == {gated_up.FLOAT32_OUTPUT} and not state.kernels_failed


@cuda
def test_weight_grad_writes_float32_from_the_accumulator() -> None:
    """On CUDA the half-precision GEMM writes the float32 gradient itself: closer to float64 than a bf16
    result cast afterwards, and no cast kernel."""
    gen = torch.Generator(device="cuda").manual_seed(6)
    a = torch.randn(96, 4096, device="cuda", generator=gen).bfloat16()
    b = torch.randn(4096, 80, device="cuda", generator=gen).bfloat16()
    want = 0.5 * a.double() @ b.double()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        got = gated_up.weight_grad(a, b, 0.5, torch.float32, KernelState())
        torch.cuda.synchronize()
    assert got.dtype == torch.float32
    assert _rel(got, want) < 1e-6 < _rel(gated_up._mm_scaled(a, b, 0.5).float(), want)
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels and not [k for k in kernels if "elementwise" in k or "copy" in k.lower()], kernels
