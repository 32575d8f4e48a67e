"""The kernel launches of one training forward + backward on the GPU code path, counted on a CPU.

The eager step is host-bound: on an H100 it takes about 75 us of host work per kernel launch (BENCHMARKS.md,
sixth session), so the launches a step are what an eager speed-up must cut. Device time is scarce, so this
counts them here: a stand-in ``triton`` whose kernels record their launches and compute nothing replaces the
real one, the adapters take their Triton fast path on CPU tensors, and every torch operator that would run a
kernel on a GPU is counted by source line. The frozen model's fused RMSNorm (``malora_train.fused_norms``),
which the CPU decomposes into small operators, counts as the single kernel CUDA runs each way, and the
adapters' weight-gradient GEMM (``gated_up.weight_grad``) as one that writes float32 itself. The stand-in
kernels leave garbage in their outputs: the counts are the result, not the loss. Autocast runs in bf16 and
the frozen model is bf16, as on a GPU.

    python scripts/count_launches.py                         # MALoRA, MoLoRA, LoRA at SmolLM2-135M shapes
    python scripts/count_launches.py --adapters malora --top 30 -- adapter.shared_input=false

Counts are per forward + backward of one micro-batch (the optimizer is left out: on a GPU it is one fused
kernel). An operator counts as a launch unless it only makes a view or allocates (``NO_KERNEL``); a GEMM
counts once.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import tempfile
import traceback
import types
from pathlib import Path

import torch
import torch._dynamo  # noqa: F401  (imported before the stand-in: torch's compiler checks for a real triton)
import torch._inductor.utils  # noqa: F401
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# operators that make views or allocate without writing: no kernel on a GPU
NO_KERNEL = frozenset({
    "view", "_unsafe_view", "reshape", "_reshape_alias", "as_strided", "alias", "detach", "t", "transpose",
    "permute", "expand", "unsqueeze", "squeeze", "select", "slice", "narrow", "unbind", "split", "chunk",
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "set_",
    "_local_scalar_dense", "promote_types", "randint"})  # the last two run on the host (dropout seeds)


class StandInKernel:
    """A ``triton.jit`` kernel that counts its launches (by name) and runs nothing."""

    launches: collections.Counter = collections.Counter()

    def __init__(self, fn) -> None:
        self.name = fn.__name__

    def __getitem__(self, grid):
        def launch(*args, **kwargs) -> None:
            StandInKernel.launches[self.name] += 1
        return launch


def install_stand_ins() -> None:
    """Put a ``triton`` whose ``jit`` makes ``StandInKernel``s in ``sys.modules`` (before malora_train
    imports it), let the adapters' kernels run on CPU tensors, and count the fused RMSNorm as CUDA runs it."""
    triton = types.ModuleType("triton")
    triton.jit = lambda fn=None, **_: StandInKernel(fn) if fn is not None else StandInKernel
    triton.cdiv = lambda a, b: -(-a // b)
    language = types.ModuleType("triton.language")
    language.__getattr__ = lambda name: name  # dtypes and constexpr markers: read, never used
    triton.language = language
    sys.modules["triton"], sys.modules["triton.language"] = triton, language

    from malora_train import fused_norms
    from malora_train.adapters.kernels import common, gated_up, projection, routed_gated_up

    common.KernelState.kernels_allowed = lambda self, t, family=None: not (self.force_torch
                                                                           or self.kernels_failed)
    common.KernelState.run = lambda self, use_kernel, kernel, fallback, family=None: (
        kernel() if use_kernel else fallback())
    projection._multiprocessors = lambda device: 132  # an H100's
    fused_norms.rms_norm = lambda x, shape, weight, eps: StandInFusedRMSNorm.apply(x, shape, weight, eps)
    gated_up.weight_grad = routed_gated_up.weight_grad = stand_in_weight_grad


def stand_in_weight_grad(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype,
                         state) -> torch.Tensor:
    """``gated_up.weight_grad`` as CUDA runs it: one GEMM writing float32 (``out_dtype``), no cast after."""
    from malora_train.adapters.kernels.gated_up import _mm_scaled

    LaunchCounter.record("addmm")
    with LaunchCounter.paused():
        return _mm_scaled(a, b, scale).to(dtype)


class StandInFusedRMSNorm(torch.autograd.Function):
    """``aten::_fused_rms_norm`` as CUDA runs it, one kernel forward and one backward (counted so); computed
    by the CPU's decomposition, whose operators are not counted."""

    @staticmethod
    def forward(ctx, x, shape, weight, eps):
        LaunchCounter.record("_fused_rms_norm")
        ctx.save_for_backward(x, weight)
        ctx.shape, ctx.eps = shape, eps
        with LaunchCounter.paused():
            return torch.nn.functional.rms_norm(x, shape, weight, eps)

    @staticmethod
    def backward(ctx, grad):
        LaunchCounter.record("_fused_rms_norm_backward")
        x, weight = ctx.saved_tensors
        with LaunchCounter.paused(), torch.enable_grad():
            leaf = x.detach().requires_grad_()
            (dx,) = torch.autograd.grad(torch.nn.functional.rms_norm(leaf, ctx.shape, weight, ctx.eps), leaf,
                                        grad)
        return dx, None, None, None


class LaunchCounter(TorchDispatchMode):
    """Counts the torch operators that would launch a kernel, by the malora_train or transformers source line
    that issued them (``<autograd>`` for the backward's own operators)."""

    active: LaunchCounter | None = None  # the counter in use (stand-ins record into it)
    counting = True  # off while a stand-in computes what it counted as one launch

    def __init__(self) -> None:
        super().__init__()
        self.by_line: collections.Counter = collections.Counter()

    def __enter__(self):
        LaunchCounter.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        LaunchCounter.active = None
        return super().__exit__(*exc)

    @classmethod
    def record(cls, name: str) -> None:
        if cls.active is not None and cls.counting:
            frames = [f for f in traceback.extract_stack()[:-2]
                      if "malora_train" in f.filename or "transformers" in f.filename]
            where = (f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "<autograd>")
            cls.active.by_line[(name, where)] += 1

    @classmethod
    @contextlib.contextmanager
    def paused(cls):
        cls.counting = False
        try:
            yield
        finally:
            cls.counting = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_KERNEL:
            self.record(name)
        return func(*args, **(kwargs or {}))


def count(adapter: str, model: str, rows: int, length: int, overrides: list[str]) -> dict:
    """One adapter's launches in a forward + backward, after one step that builds the working copies."""
    from malora_train.adapters.inject import adapter_layers
    from malora_train.cli import compose
    from malora_train.train.loop import Trainer

    cfg = compose([f"adapter={adapter}", f"model={model}", "model.dtype=bfloat16", "data=synthetic",
                   "data.packing=true", f"trainer.micro_batch_size={rows}", f"data.max_length={length}",
                   "trainer.mixed_precision=bf16", "trainer.max_steps=2", "trainer.eval_before=false",
                   "trainer.eval_after=false", "trainer.progress=false", "trainer.cuda_graphs=false",
                   *overrides])
    trainer = Trainer(cfg, Path(tempfile.mkdtemp(prefix="count_launches_")), "", [])
    trainer.train_step()
    batch = trainer._local_batch(trainer.stream.next_batch())
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    StandInKernel.launches.clear()
    with LaunchCounter() as counter:
        trainer._forward_backward({**inputs, "loss_normalizer": torch.tensor(1.0)})
    layers = len(list(adapter_layers(trainer.model)))
    torch_launches, triton_launches = sum(counter.by_line.values()), sum(StandInKernel.launches.values())
    return {"adapter": adapter, "adapted_layers": layers, "torch": torch_launches, "triton": triton_launches,
            "total": torch_launches + triton_launches, "by_line": counter.by_line,
            "by_kernel": dict(StandInKernel.launches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapters", default="malora,molora,lora")
    parser.add_argument("--model", default="smollm2_135m_shape")
    parser.add_argument("--rows", type=int, default=2, help="micro-batch rows (counts do not depend on them)")
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--top", type=int, default=15, help="list the N source lines with the most launches")
    parser.add_argument("--json", help="also write the counts here")
    parser.add_argument("overrides", nargs="*", help="more malora-train overrides (after --)")
    args = parser.parse_args()
    install_stand_ins()
    results = [count(a, args.model, args.rows, args.length, args.overrides) for a in args.adapters.split(",")]
    print(f"\nkernel launches of one forward + backward, {args.model} (optimizer not counted)")
    print(f"{'adapter':8} {'adapted layers':>15} {'torch ops':>10} {'Triton':>8} {'total':>8} "
          f"{'per layer':>10}")
    for r in results:
        print(f"{r['adapter']:8} {r['adapted_layers']:>15} {r['torch']:>10} {r['triton']:>8} {r['total']:>8} "
              f"{r['total'] / r['adapted_layers']:>10.1f}")
    if args.json:
        rows = [{**r, "by_line": [[op, where, n] for (op, where), n in r["by_line"].most_common()]}
                for r in results]
        Path(args.json).write_text(json.dumps({"model": args.model, "rows": rows}, indent=1) + "\n")
    for r in results:
        print(f"\n{r['adapter']}: Triton launches by kernel: "
              + ", ".join(f"{k} {v}" for k, v in sorted(r["by_kernel"].items(), key=lambda kv: -kv[1])))
        print(f"{r['adapter']}: the {args.top} source lines with the most torch launches")
        for (op, where), n in r["by_line"].most_common(args.top):
            print(f"  {n:6d}  {op:28} {where}")


if __name__ == "__main__":
    main()
