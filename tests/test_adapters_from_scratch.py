"""Each implementation family of every adapter kind, at the model level, against the model recomputed from
its equations (``scratch_model``: hooks on a plain Hugging Face model, losses from its logits, auxiliary
losses from the router logits), in float64: the LM loss, the auxiliary loss and the gradient of every
adapter tensor. The families share code with each other (the fast path's torch Functions, the per-expert
reference loop, and the composite path that torch.compile traces), so comparing them with each other
cannot see a bug in what they share; this can."""

from __future__ import annotations

import pytest
import torch
from adapter_specs import kind_config
from scratch_model import AdapterSpec, Equations, step_objective

from malora_train.adapters import AdaptedCausalLM, adapter_kinds, adapter_layers
from malora_train.config import AdapterConfig, RouterConfig
from malora_train.labels import IGNORE_INDEX

BALANCE, Z = 0.01, 0.01
TENSORS = {
    "lora": ["lora_A", "lora_B"],
    "molora": ["router", "lora_A", "lora_B"],
    "malora": ["router", "shared_A", "coeff_P", "lora_B"],
    "hydralora": ["router", "lora_A", "lora_B"],
}
# rank 4 and alpha 8 (MALoRA: r-bar 4 in a shared subspace of 8), 4 experts, top-2 (HydraLoRA: dense)
SPECS = {
    "lora": AdapterSpec("lora", scaling=2.0, expert_rank=4),
    "molora": AdapterSpec("molora", scaling=2.0, expert_rank=4, num_experts=4, top_k=2,
                          balance_coef=BALANCE, z_loss_coef=Z),
    "malora": AdapterSpec("malora", scaling=2.0, expert_rank=4, num_experts=4, top_k=2,
                          balance_coef=BALANCE, z_loss_coef=Z),
    "hydralora": AdapterSpec("hydralora", scaling=2.0, expert_rank=4, num_experts=4, top_k=4,
                             balance_coef=BALANCE, z_loss_coef=Z),
}


def adapter_config(kind: str, impl: str) -> AdapterConfig:
    router = RouterConfig(top_k=2, dense=kind == "hydralora", balance_coef=BALANCE, z_loss_coef=Z)
    return kind_config(kind, rank=4, alpha=8.0, dropout=0.0, num_experts=4, shared_rank=8, expert_rank=4,
                       impl=impl, router=router)


def padded_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Three right-padded rows of random prompt + answer tokens, labels on the answers only."""
    gen = torch.Generator().manual_seed(seed)
    rows = [(6, 4), (3, 8), (9, 2)]
    width = max(p + a for p, a in rows) + 3
    batch = {"input_ids": torch.zeros(len(rows), width, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE_INDEX),
             "task_ids": torch.zeros(len(rows), dtype=torch.long)}
    for row, (prompt, answer) in enumerate(rows):
        tokens = torch.randint(3, 260, (prompt + answer,), generator=gen)
        batch["input_ids"][row, :prompt + answer] = tokens
        batch["attention_mask"][row, :prompt + answer] = 1
        batch["labels"][row, prompt:prompt + answer] = tokens[prompt:]
    return batch


@pytest.mark.parametrize("family", ["fast", "reference", "composite"])
@pytest.mark.parametrize("kind", adapter_kinds())
def test_model_loss_and_gradients_match_the_equations(kind, family, make_tiny_model, monkeypatch) -> None:
    assert set(adapter_kinds()) == set(SPECS), "a new adapter kind needs its equations in scratch_model.py"
    impl = "reference" if family == "reference" else "fast"
    model = AdaptedCausalLM.from_base(make_tiny_model(0), adapter_config(kind, impl)).double().train()
    gen = torch.Generator().manual_seed(1)
    tensors = {}
    with torch.no_grad():
        for name, layer in adapter_layers(model.model):
            tensors[name] = {}
            for tensor in TENSORS[kind]:
                param = getattr(layer, tensor)
                param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64)
                            * (1.0 if tensor == "router" else 0.1))
                tensors[name][tensor] = param.detach().clone().requires_grad_()
    batch = padded_batch()
    if family == "composite":  # what runs under torch.compile, here without compiling
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    out = model(batch["input_ids"], batch["attention_mask"], batch["labels"], batch["task_ids"])
    out.loss.backward()
    monkeypatch.undo()

    plain = make_tiny_model(0).double()
    equations = Equations(plain, SPECS[kind], tensors)
    expected = step_objective(plain, equations, [batch])
    names = [(layer, tensor) for layer, kinds in tensors.items() for tensor in kinds]
    grads = torch.autograd.grad(expected.loss, [tensors[layer][tensor] for layer, tensor in names])

    assert len(tensors) == 12  # q, k, v, gate, up, down in both decoder layers
    # the LM head and its cross-entropy run in float32 by design: float32 tolerances there
    torch.testing.assert_close(out.lm_loss.double(), expected.lm_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.aux_loss.double(), expected.aux, rtol=1e-10, atol=1e-14)
    if kind != "lora":
        torch.testing.assert_close(out.balance_loss.double(), expected.balance, rtol=1e-10, atol=0)
        torch.testing.assert_close(out.z_loss.double(), expected.z, rtol=1e-10, atol=0)
        assert expected.aux > 0.01 * expected.z > 0  # the z-loss weighs in the auxiliary loss
    for (layer, tensor), grad in zip(names, grads):
        param = getattr(model.model.get_submodule(layer), tensor)
        torch.testing.assert_close(param.grad, grad, rtol=1e-5, atol=1e-6 * grad.abs().max().item(),
                                   msg=f"{layer}.{tensor}")
        assert grad.abs().max() > 0, f"{layer}.{tensor} gets no gradient: the comparison would be vacuous"
