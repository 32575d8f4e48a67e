"""The captured step (``step_path``): a training step's device work replayed as CUDA graphs.

A small model's step is thousands of small kernels (30 decoder layers, each with its adapters, forward
and backward); launched one at a time from Python they take longer than their arithmetic. Captured into
a CUDA graph, the whole forward and backward is one launch.

Two kinds of graph share one memory pool:

- a micro-batch's forward and backward, one per set of input shapes: packed rows fix every shape but
  the number of answer positions, which the trainer pads to slots that only grow (``labels.answer_slots``),
  so a run settles on one graph in its first steps;
- the update: gradient clipping, AdamW (fused, ``capturable``, its learning rate a device tensor that the
  schedule fills in place) and zeroing the gradients in place.

The first time a shape is seen its work runs eagerly: that initialises what a capture must not
(cuBLAS workspaces, Triton compilation, the optimiser's state). The second time it is captured, then
replayed from then on. Before a replay the host batch is copied into the graph's own input tensors, and a
new dropout seed into the seed tensor the kernels read (the model's ``KernelState.device_seed``). The
gradients stay allocated (zeroed, never set to None) as views of one flat bucket, so every graph accumulates
into the same tensors and several processes sum them with one all-reduce between the last micro-batch and the
update (outside the graphs: DDP's hooks cannot run inside a capture, and the adapters' gradients are small).

With ``capture=False`` (the CPU, in tests) the same bookkeeping runs with the work re-executed instead
of replayed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from malora_train.adapters.kernels.common import KernelState, draw_seed
from malora_train.train.distributed import to_device

InputKey = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


def input_key(inputs: dict[str, torch.Tensor]) -> InputKey:
    """What a captured graph is specific to: every input's name, shape and dtype."""
    return tuple((name, tuple(t.shape), t.dtype) for name, t in sorted(inputs.items()))


@dataclass
class _Captured:
    """One captured callable: its graph (None when only emulated), input tensors and output."""

    graph: torch.cuda.CUDAGraph | None
    inputs: dict[str, torch.Tensor]
    output: Any


class StepGraphs:
    """Runs ``forward_backward(device inputs)`` per micro-batch and ``update()`` per optimiser step,
    eagerly the first time, as CUDA graphs after that (see the module docstring). ``kernel_state``: the
    model's, whose dropout kernels read this object's seed tensor."""

    def __init__(self, forward_backward: Callable[[dict[str, torch.Tensor]], Any],
                 update: Callable[[], torch.Tensor | None], params: Iterable[torch.nn.Parameter],
                 device: torch.device, kernel_state: KernelState, max_graphs: int = 8,
                 all_reduce: Callable[[torch.Tensor], Any] | None = None) -> None:
        self.device = device
        self.kernel_state = kernel_state
        self.capture = device.type == "cuda"
        self.max_graphs = max_graphs
        self._forward_backward = forward_backward
        self._update = update
        self._all_reduce = all_reduce  # sums the gradient bucket over processes (None: one process)
        self._pool = torch.cuda.graph_pool_handle() if self.capture else None
        self._seen: set[InputKey] = set()
        self._micro: dict[InputKey, _Captured] = {}
        self._update_runs = 0
        self._update_graph: _Captured | None = None
        self.seed = torch.zeros(1, dtype=torch.int64, device=device)
        self.gradients = gradient_bucket(list(params))

    @property
    def graph_count(self) -> int:
        return len(self._micro) + (self._update_graph is not None)

    def micro_step(self, host_inputs: dict[str, torch.Tensor]) -> Any:
        """Forward and backward of one micro-batch given as host tensors; returns ``forward_backward``'s
        output (for a replayed graph, the tensors it captured, now holding this micro-batch's values)."""
        key = input_key(host_inputs)
        seed = draw_seed()
        captured = self._micro.get(key)
        if captured is None and (key not in self._seen or len(self._micro) >= self.max_graphs):
            self._seen.add(key)
            self.seed.fill_(seed)
            return self._run(to_device(host_inputs, self.device))
        if captured is None:
            inputs = {k: torch.empty(v.shape, dtype=v.dtype, device=self.device)
                      for k, v in host_inputs.items()}
            self._copy_in(inputs, host_inputs, seed)
            captured = self._micro[key] = self._capture(lambda: self._run(inputs), inputs)
        else:
            self._copy_in(captured.inputs, host_inputs, seed)
        return self._replay(captured, lambda: self._run(captured.inputs))

    def update(self) -> torch.Tensor | None:
        """The optimiser step (and whatever ``update`` returns: the gradient norm), after the processes have
        summed their gradients."""
        if self._all_reduce is not None:
            self._all_reduce(self.gradients)
        if self._update_graph is not None:
            return self._replay(self._update_graph, self._update)
        self._update_runs += 1
        if self._update_runs == 1:  # eagerly: the optimiser creates its state
            return self._update()
        self._update_graph = self._capture(self._update, {})
        return self._replay(self._update_graph, self._update)

    # -- internals -------------------------------------------------------------------------------------------
    def _run(self, inputs: dict[str, torch.Tensor]) -> Any:
        with self.kernel_state.device_seed(self.seed):
            return self._forward_backward(inputs)

    def _copy_in(self, inputs: dict[str, torch.Tensor], host_inputs: dict[str, torch.Tensor],
                 seed: int) -> None:
        for name, value in host_inputs.items():
            inputs[name].copy_(_pinned(value), non_blocking=True)
        self.seed.fill_(seed)

    def _capture(self, work: Callable[[], Any], inputs: dict[str, torch.Tensor]) -> _Captured:
        if not self.capture:
            return _Captured(None, inputs, None)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a data-loading thread elsewhere in the process may use CUDA meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            output = work()
        return _Captured(graph, inputs, output)

    def _replay(self, captured: _Captured, work: Callable[[], Any]) -> Any:
        if captured.graph is None:
            return work()
        captured.graph.replay()
        return captured.output


def gradient_bucket(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """One zeroed flat tensor holding every parameter's gradient: each ``param.grad`` becomes a view of it, so
    graphs accumulate into fixed memory and one collective sums them all. Adapter tensors share one dtype."""
    dtypes = {param.dtype for param in params}
    if len(dtypes) != 1:
        raise ValueError(f"the captured step's gradients need one dtype, not {sorted(map(str, dtypes))}")
    flat = torch.zeros(sum(p.numel() for p in params), dtype=dtypes.pop(), device=params[0].device)
    offset = 0
    for param in params:
        param.grad = flat[offset:offset + param.numel()].view_as(param)
        offset += param.numel()
    return flat


def _pinned(t: torch.Tensor) -> torch.Tensor:
    return t.pin_memory() if torch.cuda.is_available() and t.device.type == "cpu" else t
