"""The frozen model's fused RMSNorms (malora_train.fused_norms) against transformers' modules and a float64
computation written out here."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from malora_train.fused_norms import FusedRMSNorm, fuse_rms_norms, is_llama_rms_norm


def rms_norm_float64(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x64 = x.double()
    return weight.double() * x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + eps)


def norm_pair(cls: type, dtype: torch.dtype, width: int = 48, eps: float = 1e-6):
    torch.manual_seed(0)
    reference = cls(width, eps=eps).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(1 + 0.5 * torch.randn(width))
    reference.weight.requires_grad_(False)  # frozen, as in training
    return reference, FusedRMSNorm(reference)


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen2RMSNorm, Qwen3RMSNorm])
def test_float32_output_and_input_gradient_equal_transformers_and_float64(cls):
    reference, fused = norm_pair(cls, torch.float32)
    x = (3 * torch.randn(2, 5, 48)).requires_grad_()
    grad = torch.randn(2, 5, 48)
    expected = reference(x)
    (expected_dx,) = torch.autograd.grad(expected, x, grad)
    got = fused(x)
    (dx,) = torch.autograd.grad(got, x, grad)
    assert torch.equal(got, expected)
    torch.testing.assert_close(dx, expected_dx, rtol=1e-5, atol=1e-6)
    x64 = x.detach().double().requires_grad_()
    want = rms_norm_float64(x64, reference.weight, reference.variance_epsilon)
    (dx64,) = torch.autograd.grad(want, x64, grad.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=1e-4, atol=1e-5)


def test_bfloat16_rounds_once_and_keeps_the_dtype_under_autocast():
    reference, fused = norm_pair(LlamaRMSNorm, torch.bfloat16)
    x = 3 * torch.randn(4, 16, 48, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, expected = fused(x), reference(x)
    assert got.dtype == expected.dtype == torch.bfloat16
    want = rms_norm_float64(x, reference.weight, reference.variance_epsilon)
    # one rounding of the exact value: within half a bf16 unit (2^-8 relative); transformers' two within one
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-30).all()
    assert ((expected.double() - want).abs() <= want.abs() * 2.0 ** -7 + 1e-30).all()


def test_float64_keeps_transformers_float32_normalisation():
    reference, fused = norm_pair(LlamaRMSNorm, torch.float64)
    x = torch.randn(3, 48, dtype=torch.float64)
    assert torch.equal(fused(x), reference(x))
    assert not torch.equal(fused(x), rms_norm_float64(x, reference.weight, reference.variance_epsilon))


def test_a_weight_of_another_dtype_gives_transformers_result_and_dtype():
    reference, fused = norm_pair(LlamaRMSNorm, torch.float32)
    x = torch.randn(3, 48, dtype=torch.bfloat16)
    got = fused(x)
    assert got.dtype == torch.float32
    assert torch.equal(got, reference(x))


def test_under_torch_compile_the_compiler_gets_transformers_operators_to_fuse():
    reference, fused = norm_pair(LlamaRMSNorm, torch.float32)
    graphs = []

    def keep_graph(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    torch._dynamo.reset()
    x = torch.randn(2, 5, 48)
    got = torch.compile(fused, backend=keep_graph, fullgraph=True)(x)
    assert torch.equal(got, reference(x))
    assert len(graphs) == 1 and "rsqrt" in graphs[0] and "rms_norm" not in graphs[0]


def test_only_llama_family_norms_are_recognised():
    assert is_llama_rms_norm(LlamaRMSNorm(8)) and is_llama_rms_norm(Qwen2RMSNorm(8))
    assert not is_llama_rms_norm(GemmaRMSNorm(8))  # (1 + weight), in float32
    assert not is_llama_rms_norm(Olmo2RMSNorm(8))  # the weight applied before the cast back
    assert not is_llama_rms_norm(torch.nn.LayerNorm(8))


def test_the_tiny_model_fuses_every_norm_and_computes_what_it_did(make_tiny_model, tiny_model_cfg):
    from malora_train.models import load_model

    fused = make_tiny_model()
    plain = load_model(dataclasses.replace(tiny_model_cfg, fused_norms=False)).eval()
    layers = plain.config.num_hidden_layers
    assert sum(isinstance(m, FusedRMSNorm) for m in fused.modules()) == 2 * layers + 1
    assert sum(isinstance(m, LlamaRMSNorm) for m in plain.modules()) == 2 * layers + 1
    assert not any(isinstance(m, LlamaRMSNorm) for m in fused.modules())
    assert fused.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 260, (2, 12))
    with torch.no_grad():
        assert torch.equal(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    assert fuse_rms_norms(fused) == 0  # nothing left to replace


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_one_kernel_each_way_and_one_rounding():
    from torch.profiler import ProfilerActivity, profile

    reference, fused = norm_pair(LlamaRMSNorm, torch.bfloat16)
    reference.cuda()
    x = (3 * torch.randn(64, 48, dtype=torch.bfloat16, device="cuda")).requires_grad_()
    grad = torch.randn_like(x)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fused(x).backward(grad)  # warm-up
        x.grad = None
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = fused(x)
            got.backward(grad)
            torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 2, [e.name for e in kernels]
    want = rms_norm_float64(x.detach(), reference.weight, reference.variance_epsilon)
    assert got.dtype == torch.bfloat16
    assert ((got.double() - want).abs() <= want.abs() * 2.0 ** -8 + 1e-30).all()
    x64 = x.detach().double().requires_grad_()
    (dx64,) = torch.autograd.grad(rms_norm_float64(x64, reference.weight, reference.variance_epsilon), x64,
                                  grad.double())
    torch.testing.assert_close(x.grad.double(), dx64, rtol=2e-2, atol=2e-2)
