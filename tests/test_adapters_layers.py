"""Each adapter layer against its equation in docs/method.md, recomputed here token by token and expert by
expert in float64; its gradients (gradcheck, fast == reference); and the fast path's shape (no Python
loop over experts, every expert in the autograd graph)."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, replace

import pytest
import torch
from adapter_specs import kind_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from malora_train.adapters import ADAPTER_CLASSES, adapter_kinds
from malora_train.adapters.base import MixtureAdapterLinear
from malora_train.config import AdapterConfig, RouterConfig

IN, OUT = 12, 10
TOL = 1e-10
IMPLS = ["fast", "reference"]


@dataclass(frozen=True)
class Spec:
    """One adapter set-up, with the sizes the equations need (so the test never reads them off the layer)."""

    kind: str
    rank: int = 3  # r (MALoRA: the MoLoRA budget rank that lam sizes from)
    num_experts: int = 4
    top_k: int = 2
    dense: bool = False
    renormalize: bool = True
    alpha: float | None = 5.0
    use_rslora: bool = False
    lam: float = 0.5
    shared_rank: int | None = None
    expert_rank: int | None = None
    dropout: float = 0.0

    def sizes(self) -> tuple[int, int | None]:
        """(expert rank R, shared rank d): docs/method.md's d = lam r N, r-bar = r + (1 - lam) r for
        MALoRA."""
        if self.kind != "malora":
            return self.rank, None
        d = self.shared_rank if self.shared_rank is not None else self.lam * self.rank * self.num_experts
        r_bar = self.expert_rank if self.expert_rank is not None else self.rank + (1 - self.lam) * self.rank
        assert float(d).is_integer() and float(r_bar).is_integer(), "pick a spec with integral sizes"
        return int(r_bar), int(d)

    def scaling(self) -> float:
        rank, _ = self.sizes()
        alpha = self.alpha if self.alpha is not None else 2.0 * rank
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def active_experts(self) -> int:
        return self.num_experts if self.dense else self.top_k

    def config(self, impl: str) -> AdapterConfig:
        router = RouterConfig(top_k=self.top_k, dense=self.dense, renormalize=self.renormalize,
                              jitter_noise=0.0)
        return kind_config(self.kind, rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                           use_rslora=self.use_rslora, num_experts=self.num_experts, lam=self.lam,
                           shared_rank=self.shared_rank, expert_rank=self.expert_rank, impl=impl,
                           router=router)


def build_layer(spec: Spec, impl: str, in_features: int = IN, out_features: int = OUT, seed: int = 0,
                dtype: torch.dtype = torch.float64):
    """An adapted ``nn.Linear``, wholly in ``dtype``, with every adapter tensor random (B starts at 0)."""
    torch.manual_seed(seed)
    base = nn.Linear(in_features, out_features, dtype=dtype)
    kwargs = {}
    cls = ADAPTER_CLASSES[spec.kind]
    if issubclass(cls, MixtureAdapterLinear):
        kwargs["context"] = None
    layer = cls(base, spec.config(impl), **kwargs).to(dtype)
    with torch.no_grad():
        for name in layer.tensor_kinds:
            getattr(layer, name).normal_(0.0, 0.5)
    return layer


def expected_output(layer, spec: Spec, x: torch.Tensor, dropped: torch.Tensor | None = None) -> torch.Tensor:
    """docs/method.md, one token and one expert at a time:

    LoRA        y = W0 x + s B A xd
    MoLoRA      y = W0 x + s sum_{t in TopK} g_t B_t A_t xd
    MALoRA      y = W0 x + s sum_{t in TopK} g_t B_t P_t S_A xd
    HydraLoRA   y = W0 x + s sum_{t in TopK} g_t B_t A xd
    with p = softmax(W_g x), g = p on the top-K (renormalised to sum 1 unless switched off), and xd the
    dropped-out input. Expert t owns rows [tR, (t+1)R) of lora_A / coeff_P and columns [tR, (t+1)R) of lora_B.
    """
    rank, _ = spec.sizes()
    scaling = spec.scaling()
    tokens = x.reshape(-1, x.shape[-1])
    dropped_tokens = tokens if dropped is None else dropped.reshape(tokens.shape)
    weight, bias = layer.base.weight, layer.base.bias
    rows = []
    for x_i, xd_i in zip(tokens, dropped_tokens):
        y = weight @ x_i + bias
        if spec.kind == "lora":
            y = y + scaling * (layer.lora_B @ (layer.lora_A @ xd_i))
        else:
            for expert, gate in expected_gates(layer.router, spec, x_i).items():
                cols = slice(expert * rank, (expert + 1) * rank)
                if spec.kind == "molora":
                    down = layer.lora_A[cols] @ xd_i
                elif spec.kind == "malora":
                    down = layer.coeff_P[cols] @ (layer.shared_A @ xd_i)
                else:  # hydralora: one shared A
                    down = layer.lora_A @ xd_i
                y = y + scaling * gate * (layer.lora_B[:, cols] @ down)
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], -1)


def expected_gates(router: torch.Tensor, spec: Spec, x_i: torch.Tensor) -> dict[int, torch.Tensor]:
    """{expert: gate} for one token: softmax, keep the K largest, renormalise if asked."""
    logits = router @ x_i
    exp = torch.exp(logits - logits.max())
    probs = exp / exp.sum()
    order = sorted(range(spec.num_experts), key=lambda e: -probs[e].item())
    chosen = order[:spec.active_experts()]
    total = sum(probs[e] for e in chosen)
    return {e: probs[e] / total if spec.renormalize else probs[e] for e in chosen}


def separated_input(layer, spec: Spec, shape: tuple[int, ...], gap: float = 1e-3,
                    seed: int = 1) -> torch.Tensor:
    """A random input whose top-K choice is not near a tie (gradcheck perturbs by 1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(1000):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
        if spec.kind == "lora" or spec.active_experts() == spec.num_experts:
            return x
        probs = torch.softmax(x.reshape(-1, shape[-1]) @ layer.router.detach().t(), dim=-1)
        top = probs.topk(spec.active_experts() + 1, dim=-1).values
        if (top[:, -2] - top[:, -1]).min() > gap:
            return x
    raise AssertionError("no tie-free input found")


LAYER_SPECS = {
    "lora": Spec("lora"),
    "lora-rslora": Spec("lora", use_rslora=True),
    "lora-default-alpha": Spec("lora", alpha=None),
    "molora-top2": Spec("molora"),
    "molora-top2-no-renorm": Spec("molora", renormalize=False),
    "molora-top1": Spec("molora", top_k=1),
    "molora-dense": Spec("molora", dense=True),
    "molora-rslora": Spec("molora", use_rslora=True),
    "malora-lam": Spec("malora", rank=4, lam=0.5, alpha=None),  # d = 8, r-bar = 6, alpha = 12
    "malora-explicit": Spec("malora", shared_rank=6, expert_rank=3),
    "malora-top1": Spec("malora", shared_rank=6, expert_rank=3, top_k=1),
    "malora-no-renorm": Spec("malora", shared_rank=6, expert_rank=3, renormalize=False),
    "malora-dense": Spec("malora", shared_rank=6, expert_rank=3, dense=True),
    "hydralora-dense": Spec("hydralora", dense=True),
    "hydralora-top2": Spec("hydralora"),
}


@pytest.mark.parametrize("specs", ["LAYER_SPECS", "DROPOUT_SPECS", "GRAD_SPECS"])
def test_every_registered_kind_has_its_equation_checked(specs: str) -> None:
    """A new adapter kind fails here until its equations and specs are added to this file."""
    assert {spec.kind for spec in globals()[specs].values()} == set(adapter_kinds())


def _shapes(spec: Spec) -> dict[str, tuple[int, int]]:
    rank, d = spec.sizes()
    n_r = spec.num_experts * rank
    return {
        "lora": {"lora_A": (rank, IN), "lora_B": (OUT, rank)},
        "molora": {"router": (spec.num_experts, IN), "lora_A": (n_r, IN), "lora_B": (OUT, n_r)},
        "malora": {"router": (spec.num_experts, IN), "shared_A": (d, IN), "coeff_P": (n_r, d),
                   "lora_B": (OUT, n_r)},
        "hydralora": {"router": (spec.num_experts, IN), "lora_A": (rank, IN), "lora_B": (OUT, n_r)},
    }[spec.kind]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(LAYER_SPECS))
def test_output_matches_equation(name: str, impl: str) -> None:
    spec = LAYER_SPECS[name]
    layer = build_layer(spec, impl).eval()
    assert {n: tuple(getattr(layer, n).shape) for n in layer.tensor_kinds} == _shapes(spec)
    x = separated_input(layer, spec, (2, 5, IN))
    with torch.no_grad():
        out = layer(x)
    assert out.shape == (2, 5, OUT) and out.dtype == torch.float64
    torch.testing.assert_close(out, expected_output(layer, spec, x), rtol=0, atol=TOL)


# in = 4 and enough rank that each token's adapter map M (out x in) is injective: dropout(x) is then
# recovered exactly from the output, whatever random numbers the implementation draws for its mask
DROPOUT_IN, DROPOUT_P = 4, 0.4
DROPOUT_SPECS = {
    "lora": Spec("lora", rank=4),
    "molora": Spec("molora", rank=2),  # K r = 4
    "malora": Spec("malora", shared_rank=4, expert_rank=2),
    "hydralora": Spec("hydralora", rank=4, dense=True),
}


def _adapter_maps(layer, spec: Spec, x: torch.Tensor) -> torch.Tensor:
    """(T, out, in): column j of token t's map is the equation's delta for dropout(x_t) = e_j."""
    tokens = x.reshape(-1, x.shape[-1])
    offset = expected_output(layer, spec, x, torch.zeros_like(tokens)).reshape(tokens.shape[0], -1)
    columns = [expected_output(layer, spec, x, torch.eye(x.shape[-1], dtype=x.dtype)[j].expand_as(tokens))
               .reshape(tokens.shape[0], -1) - offset for j in range(x.shape[-1])]
    return torch.stack(columns, dim=-1)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kind", list(DROPOUT_SPECS))
def test_dropout_is_identity_in_eval_and_masks_the_adapter_input_in_training(kind: str, impl: str) -> None:
    """Training: y = W0 x + M(x) (x * m / (1 - p)), m a 0/1 mask shared by every expert of the token and
    the router reading the undropped x. Recovered per token by least squares on the injective M(x)."""
    spec = replace(DROPOUT_SPECS[kind], dropout=DROPOUT_P)
    layer = build_layer(spec, impl, in_features=DROPOUT_IN)
    gen = torch.Generator().manual_seed(3)
    # |x| >= 0.5: drops are visible
    x = torch.rand(4, 25, DROPOUT_IN, generator=gen, dtype=torch.float64) + 0.5
    x = x * torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0).double()
    with torch.no_grad():
        torch.testing.assert_close(layer.eval()(x), expected_output(layer, spec, x), rtol=0, atol=TOL)
        out = layer.train()(x)
    tokens = x.reshape(-1, DROPOUT_IN)
    maps = _adapter_maps(layer, spec, x)
    assert torch.linalg.svdvals(maps).min() > 1e-3  # M(x) injective for every token
    delta = (out - layer.base(x)).reshape(tokens.shape[0], -1, 1)
    dropped = torch.linalg.lstsq(maps, delta).solution
    torch.testing.assert_close(maps @ dropped, delta, rtol=0, atol=1e-9)  # delta lies in M(x)'s range
    ratio = dropped.squeeze(-1) / tokens
    kept = (ratio - 1 / (1 - DROPOUT_P)).abs() < 1e-8
    assert (kept | (ratio.abs() < 1e-8)).all(), "dropout(x) must be 0 or x / (1 - p) elementwise"
    assert abs((~kept).float().mean().item() - DROPOUT_P) < 0.1  # 400 draws: 4 standard deviations


# -- gradients --------------------------------------------------------------------------------------

GRAD_SPECS = {
    "lora": Spec("lora", rank=2),
    "molora": Spec("molora", rank=2, num_experts=3),
    "malora": Spec("malora", num_experts=3, shared_rank=4, expert_rank=2),
    "hydralora": Spec("hydralora", rank=2, num_experts=3, dense=True),
    "molora-top1-no-renorm": Spec("molora", rank=2, num_experts=3, top_k=1, renormalize=False),
}
GRAD_IN, GRAD_OUT = 6, 5


def _functional(layer):
    names = list(layer.tensor_kinds)

    def forward(x, *tensors):
        return torch.func.functional_call(layer, dict(zip(names, tensors)), (x,))

    return names, forward


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("name", list(GRAD_SPECS))
def test_gradcheck_input_and_every_adapter_tensor(name: str, impl: str) -> None:
    spec = GRAD_SPECS[name]
    layer = build_layer(spec, impl, GRAD_IN, GRAD_OUT).eval()
    names, forward = _functional(layer)
    x = separated_input(layer, spec, (2, 2, GRAD_IN)).requires_grad_()
    tensors = [getattr(layer, n).detach().clone().requires_grad_() for n in names]
    assert torch.autograd.gradcheck(forward, (x, *tensors), eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", list(LAYER_SPECS))
def test_fast_and_reference_gradients_agree(name: str) -> None:
    spec = LAYER_SPECS[name]
    grads = {}
    for impl in IMPLS:
        layer = build_layer(spec, impl).train()
        x = separated_input(layer, spec, (2, 5, IN)).requires_grad_()
        weights = torch.randn(2, 5, OUT, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        (layer(x) * weights).sum().backward()
        grads[impl] = {"x": x.grad, **{n: getattr(layer, n).grad for n in layer.tensor_kinds}}
    assert grads["fast"].keys() == grads["reference"].keys()
    for key, fast_grad in grads["fast"].items():
        torch.testing.assert_close(fast_grad, grads["reference"][key], rtol=0, atol=TOL, msg=key)


# -- the fast path's shape --------------------------------------------------------------------------

class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


MIXTURE_KINDS = {
    "molora": Spec("molora"),
    "malora": Spec("malora", shared_rank=6, expert_rank=3),
    "hydralora": Spec("hydralora", dense=True),
}


def _ops(spec: Spec, impl: str, num_experts: int, backward: bool = True) -> Counter:
    layer = build_layer(replace(spec, num_experts=num_experts), impl, dtype=torch.float32).train()
    x = torch.randn(2, 5, IN, requires_grad=True)
    with OpCounter() as counter:
        loss = layer(x).square().sum()
        if backward:
            loss.backward()
    return counter.ops


@pytest.mark.parametrize("kind", list(MIXTURE_KINDS))
def test_fast_path_op_count_does_not_grow_with_experts(kind: str) -> None:
    spec = MIXTURE_KINDS[kind]
    few, many = _ops(spec, "fast", 3), _ops(spec, "fast", 16)  # N > K: a real top-K for both
    assert sum(few.values()) > sum(_ops(spec, "fast", 3, backward=False).values())  # backward counted too
    assert few == many
    # the counter does see a loop over experts: the reference path grows with N
    assert sum(_ops(spec, "reference", 16).values()) > sum(_ops(spec, "reference", 3).values())


@pytest.mark.parametrize("kind", list(MIXTURE_KINDS))
def test_fast_path_gives_every_adapter_tensor_a_gradient(kind: str) -> None:
    """Top-1 of 16 experts on 3 tokens leaves most experts unchosen; they must still get a (zero) grad."""
    spec = MIXTURE_KINDS[kind]
    spec = replace(spec, num_experts=16, top_k=spec.top_k if spec.dense else 1)  # dense: top_k is unused
    layer = build_layer(spec, "fast", dtype=torch.float32).train()
    layer(torch.randn(1, 3, IN)).sum().backward()
    for name, param in layer.named_parameters():
        if param.requires_grad:
            assert param.grad is not None, name
    assert set(layer.tensor_kinds) <= {n for n, p in layer.named_parameters() if p.requires_grad}
