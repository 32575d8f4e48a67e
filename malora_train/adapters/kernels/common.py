"""What the adapter operations share: the dtypes their kernels compute in, block padding, dropout seeds,
and ``KernelState``, one model's choice between the Triton kernels and the torch path."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

Result = TypeVar("Result")

# trainer.compile_adapters: the adapters traced into the compiled graphs, run on their kernels between them,
# or auto: kernels for mixtures, traced for plain LoRA (``runs_as_kernels``)
COMPILE_ADAPTERS = ("auto", "traced", "kernels")
# the dtypes the kernels compute in, each with its name in triton.language; any other runs the torch path
KERNEL_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def runs_as_kernels(setting: str, routed: bool) -> bool:
    """Whether ``trainer.compile_adapters=setting`` runs the adapted layers on their kernels between the
    compiled pieces. ``auto`` does for mixtures (``routed``): on an H100, captured MALoRA ran 1.29x and MoLoRA
    1.40x faster this way than captured without compile, where traced MALoRA gained nothing (the compiled
    routing costs more than the fused kernels); the compiler fuses plain LoRA's few ops well, so it is
    traced."""
    return setting == "kernels" or (setting == "auto" and routed)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of the adapter matmuls: autocast's when it is on, else the input's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def pad(size: int, least: int = 16) -> int:
    """``size`` rounded up to a power of two and to at least ``least``: a kernel block's side (``tl.arange``
    takes powers of two, and ``tl.dot`` operands have at least 16 rows and columns)."""
    return max(least, 1 << (size - 1).bit_length())


def draw_seed() -> int:
    """A dropout seed from torch's CPU generator: no device sync, reproducible under ``manual_seed``,
    and replayed by activation checkpointing (which restores the CPU RNG state before recomputing)."""
    return int(torch.randint(0, 2**31 - 1, (1,)).item())


class KernelState:
    """How one model's adapter operations run; the model owns it and its adapted layers share it.

    ``force_torch`` (``MALORA_FUSED=torch`` in the environment) runs the torch path on CUDA too, for
    benchmarks and debugging. ``kernels_failed`` is set by the first kernel that fails to build or launch:
    the torch path runs from then on. A kernel run as part of a ``family`` that other code stands in for
    (``routed_gated_up``'s, which the two-step kernels replace; ``weight_grad``'s float32-output GEMM, which a
    cast replaces) turns off only that family.
    ``device_seed`` lends the dropout kernels a seed tensor to read.
    ``compiled_as_kernels`` (``runs_as_kernels`` of ``trainer.compile_adapters``): under ``torch.compile``
    each adapted layer runs eagerly on its fast path between the compiled pieces, instead of being traced as
    plain torch ops.
    """

    def __init__(self) -> None:
        self.force_torch = os.environ.get("MALORA_FUSED", "") == "torch"
        self.kernels_failed = False
        self.failed_families: set[str] = set()
        self.compiled_as_kernels = False
        self._device_seed: torch.Tensor | None = None
        self._zeros: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def zero(self, like: torch.Tensor) -> torch.Tensor:
        """A 0-dim zero on ``like``'s device and dtype, made once (a fill kernel a call fewer); read-only."""
        key = (like.device, like.dtype)
        if key not in self._zeros:
            self._zeros[key] = torch.zeros((), device=like.device, dtype=like.dtype)
        return self._zeros[key]

    def kernels_allowed(self, t: torch.Tensor, family: str | None = None) -> bool:
        """Whether the Triton kernels (of ``family``) may run on ``t``: a CUDA tensor, no kernel (of the
        family) failed, torch not forced."""
        return (t.is_cuda and not self.force_torch and not self.kernels_failed
                and family not in self.failed_families)

    def run(self, use_kernel: bool, kernel: Callable[[], Result], torch_path: Callable[[], Result],
            family: str | None = None) -> Result:
        """``kernel()`` when ``use_kernel``, else ``torch_path()``, which also stands in for a kernel that
        fails to build or launch: a broken Triton install or an unsupported GPU must not stop training. The
        first failure warns and turns the kernels off for the rest of the run (only its ``family``'s, when
        given)."""
        if use_kernel:
            try:
                return kernel()
            except Exception as err:  # noqa: BLE001 - any build or launch failure
                if not (self.kernels_failed or family in self.failed_families):
                    what = f"the {family} kernels" if family else "Triton adapter kernels"
                    instead = "what stands in for them" if family else "the plain torch fast path"
                    warnings.warn(f"malora_train: {what} failed ({type(err).__name__}: {err}); using "
                                  f"{instead} instead", RuntimeWarning, stacklevel=2)
                if family:
                    self.failed_families.add(family)
                else:
                    self.kernels_failed = True
        return torch_path()

    @contextlib.contextmanager
    def device_seed(self, seed: torch.Tensor) -> Iterator[None]:
        """Inside: the dropout kernels read their seed from ``seed`` (a one-element int64 CUDA tensor) when
        they run, plus a salt per layer, instead of taking a number drawn when they are launched. A CUDA
        graph replays its kernels with the arguments of its capture, so a captured step draws new masks
        only this way (the caller writes a new seed before each replay)."""
        previous, self._device_seed = self._device_seed, seed
        try:
            yield
        finally:
            self._device_seed = previous

    def dropout_seed(self, salt: int) -> int | tuple[torch.Tensor, int]:
        """The dropout seed of the layer salted ``salt``: a number drawn now, or under ``device_seed`` the
        seed tensor and the salt in its high 32 bits (Philox's high key word), added when the kernel runs."""
        if self._device_seed is None:
            return draw_seed()
        return self._device_seed, salt << 32
