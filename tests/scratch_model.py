"""The adapted model recomputed from docs/method.md's equations on a plain Hugging Face model, sharing no code
with ``malora_train.adapters`` or the training loop: tests compare the package's losses, logged metrics
and gradients with it.

- ``Equations`` hooks the plain model's adapted ``nn.Linear`` layers: each adds its delta
  (LoRA ``s B A x``; a mixture ``s sum_{t in TopK} g_t B_t down_t(x)``, experts one by one), and records
  the router logits from which ``Equations.aux`` recomputes softmax, top-K, the balance loss and the z-loss.
- ``documents`` cuts a batch (padded rows, or packed rows of several examples) into its examples, and
  ``answer_losses`` takes each one's cross-entropy over its answer tokens straight from the model's logits,
  one unpadded forward per example.
- ``step_objective`` is what one optimiser step minimises: summed answer-token losses over the step's
  answer-token count, plus the mean over its forwards of each forward's auxiliary loss.
- ``training_forwards`` replays the batches a run drew, split over ranks as ``grad_accum`` x processes
  forwards (rank r takes the r-th block of rows of each global micro-batch); ``recompute_steps`` and
  ``assert_logged_step`` check a run's ``metrics.jsonl`` against them.

The tiny-model tests run it in float64 (``model.double()``), so that what is left of a comparison is the
package's float32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

IGNORE = -100  # the label of prompt and padding tokens (PyTorch's cross_entropy default)
FILE_PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSpec:
    """The numbers the equations need, given by the test (never read off the package's layers)."""

    kind: str  # lora, molora, malora, hydralora
    scaling: float  # alpha / r (alpha / r-bar for MALoRA)
    expert_rank: int = 0  # R: expert t owns rows [tR, (t+1)R) of its down-projection, columns of lora_B
    num_experts: int = 1
    top_k: int = 1  # = num_experts for dense routing
    renormalize: bool = True
    balance_coef: float = 0.0
    z_loss_coef: float = 0.0


def read_adapter_file(path: str | Path,
                      dtype: torch.dtype = torch.float64) -> dict[str, dict[str, torch.Tensor]]:
    """``adapter_model.safetensors`` (keys ``base_model.model.<layer>.<tensor>.weight``) as
    {layer path: {tensor name: tensor}}."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(path)).items():
        layer, tensor = key.removeprefix(FILE_PREFIX).removesuffix(".weight").rsplit(".", 1)
        layers.setdefault(layer, {})[tensor] = value.to(dtype)
    return layers


def mixture_gates(logits: torch.Tensor, spec: AdapterSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(probs, gates, chosen) for (T, N) logits: softmax, the K largest kept (renormalised to sum 1 unless
    switched off), zeros elsewhere; ``chosen`` (T, N) counts each token's slots per expert."""
    probs = torch.softmax(logits, dim=-1)
    values, index = probs.topk(spec.top_k, dim=-1)
    if spec.renormalize:
        values = values / values.sum(dim=-1, keepdim=True)
    gates = torch.zeros_like(probs).scatter(-1, index, values)
    chosen = F.one_hot(index, spec.num_experts).sum(dim=1).to(probs.dtype)
    return probs, gates, chosen


class Equations:
    """Forward hooks on ``model``'s linear layers named in ``tensors`` ({layer path: {tensor name: tensor}},
    the tensors as they are: pass leaves with ``requires_grad`` to take gradients). Router logits are
    recorded per layer for every token that passes, until ``aux`` reads and clears them."""

    def __init__(self, model: nn.Module, spec: AdapterSpec,
                 tensors: dict[str, dict[str, torch.Tensor]]) -> None:
        self.spec = spec
        self.tensors = tensors
        self.logits: dict[str, list[torch.Tensor]] = {layer: [] for layer in tensors}
        self.hooks = [model.get_submodule(layer).register_forward_hook(self._hook(layer))
                      for layer in tensors]

    def _hook(self, layer: str):
        def add_delta(module: nn.Module, inputs: tuple[torch.Tensor, ...],
                      output: torch.Tensor) -> torch.Tensor:
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            return output + self.delta(layer, x).reshape(output.shape).to(output.dtype)

        return add_delta

    def delta(self, layer: str, x: torch.Tensor) -> torch.Tensor:
        spec, t = self.spec, self.tensors[layer]
        if spec.kind == "lora":
            return spec.scaling * (x @ t["lora_A"].t()) @ t["lora_B"].t()
        logits = x @ t["router"].t()
        self.logits[layer].append(logits)
        _, gates, _ = mixture_gates(logits, spec)
        delta = torch.zeros(x.shape[0], t["lora_B"].shape[0], dtype=x.dtype)
        for expert in range(spec.num_experts):
            rows = slice(expert * spec.expert_rank, (expert + 1) * spec.expert_rank)
            if spec.kind == "molora":
                down = x @ t["lora_A"][rows].t()
            elif spec.kind == "malora":
                down = (x @ t["shared_A"].t()) @ t["coeff_P"][rows].t()
            elif spec.kind == "hydralora":
                down = x @ t["lora_A"].t()
            else:
                raise ValueError(f"no equations for adapter kind {spec.kind!r}")
            delta = delta + spec.scaling * gates[:, expert:expert + 1] * (down @ t["lora_B"][:, rows].t())
        return delta

    def aux(self) -> dict[str, torch.Tensor]:
        """The auxiliary losses of the tokens recorded since the last call (one forward of the package:
        the balance statistics are per forward), then forgets them: per layer the balance loss
        ``N sum_i f_i P_i`` (f_i: share of the token-slot assignments, P_i: mean probability) and the
        z-loss ``mean logsumexp(logits)^2``, each averaged over layers, and
        ``aux = c_bal mean(balance) + c_z mean(z)``."""
        spec = self.spec
        if spec.kind == "lora":
            return self.no_aux()
        balances, zs = [], []
        for recorded in self.logits.values():
            logits = torch.cat(recorded)
            probs, _, chosen = mixture_gates(logits, spec)
            share = chosen.mean(dim=0) / spec.top_k
            balances.append(spec.num_experts * (share * probs.mean(dim=0)).sum())
            zs.append(torch.logsumexp(logits, dim=-1).square().mean())
            recorded.clear()
        balance, z = torch.stack(balances).mean(), torch.stack(zs).mean()
        return {"aux": spec.balance_coef * balance + spec.z_loss_coef * z, "balance": balance, "z": z}

    @staticmethod
    def no_aux() -> dict[str, torch.Tensor]:
        zero = torch.zeros((), dtype=torch.float64)
        return {"aux": zero, "balance": zero, "z": zero}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


@dataclass
class Document:
    """One example of a batch, without padding: its tokens, labels (IGNORE on the prompt) and task per
    token."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    task: torch.Tensor


def documents(batch: dict[str, torch.Tensor]) -> list[Document]:
    """The examples of a batch: each padded row's real tokens, or each packed row's documents."""
    found = []
    for row in range(batch["input_ids"].shape[0]):
        real = batch["attention_mask"][row].bool()
        if "document_ids" in batch:
            ids = batch["document_ids"][row]
            spans = [real & (ids == doc) for doc in ids[real].unique().tolist()]
        else:
            spans = [real]
        for span in spans:
            tasks = batch["task_ids"][row]
            task = tasks[span] if tasks.dim() == 1 else tasks.expand(int(span.sum()))
            found.append(Document(batch["input_ids"][row][span], batch["labels"][row][span], task))
    return found


def answer_losses(model: nn.Module, doc: Document) -> tuple[torch.Tensor, torch.Tensor]:
    """(losses, tasks) of the document's answer tokens: token j is predicted from the logits at j - 1;
    one forward of the whole model on the unpadded example."""
    logits = model(input_ids=doc.input_ids.unsqueeze(0)).logits[0]
    target = doc.labels[1:]
    answered = target != IGNORE
    losses = F.cross_entropy(logits[:-1][answered].double(), target[answered], reduction="none")
    return losses, doc.task[1:][answered]


@dataclass
class StepObjective:
    loss: torch.Tensor  # lm_loss + aux: what the step minimises (differentiable)
    lm_loss: torch.Tensor  # summed answer-token losses / the step's answer-token count
    aux: torch.Tensor  # mean over the step's forwards of their auxiliary losses
    balance: torch.Tensor  # mean over forwards of the layer-averaged balance loss
    z: torch.Tensor  # mean over forwards of the layer-averaged z-loss
    task_loss: dict[int, float]  # task index -> mean loss of its answer tokens (tasks with answers only)
    examples: int  # how many examples the step's rows held


def step_objective(model: nn.Module, equations: Equations | None,
                   forwards: list[dict[str, torch.Tensor]]) -> StepObjective:
    """One optimiser step of ``forwards`` (a list of batches, one per forward of any rank); without
    ``equations`` the plain model (an adapter whose B is 0: no auxiliary loss counted)."""
    total = torch.zeros((), dtype=torch.float64)
    sums: dict[int, float] = {}
    counts: dict[int, int] = {}
    auxes, examples = [], 0
    for batch in forwards:
        docs = documents(batch)
        examples += len(docs)
        for doc in docs:
            losses, tasks = answer_losses(model, doc)
            total = total + losses.sum()
            for loss, task in zip(losses.tolist(), tasks.tolist()):
                sums[task] = sums.get(task, 0.0) + loss
                counts[task] = counts.get(task, 0) + 1
        auxes.append(equations.aux() if equations is not None else Equations.no_aux())
    lm_loss = total / sum(counts.values())
    aux = torch.stack([a["aux"] for a in auxes]).mean()
    balance, z = (torch.stack([a[key] for a in auxes]).mean() for key in ("balance", "z"))
    return StepObjective(lm_loss + aux, lm_loss, aux, balance, z, {t: sums[t] / counts[t] for t in sums},
                         examples)


def grad_norm(loss: torch.Tensor, tensors: dict[str, dict[str, torch.Tensor]]) -> float:
    """The L2 norm of the gradient of ``loss`` over every tensor (the clipping norm the trainer logs)."""
    leaves = [t for layer in tensors.values() for t in layer.values()]
    grads = torch.autograd.grad(loss, leaves)
    return float(torch.sqrt(sum(g.square().sum() for g in grads)))


def training_forwards(cfg, steps: int,
                      world_size: int = 1) -> tuple[list[list[dict[str, torch.Tensor]]], list[str]]:
    """(per step, the batches of its forwards; task names) that a run of ``cfg`` on ``world_size``
    processes drew: ``grad_accum`` global micro-batches a step, each cut into one block of rows per rank."""
    from malora_train.data import BatchStream, build_tasks
    from malora_train.models import load_tokenizer

    data = dataclasses.replace(cfg.data, packing=bool(cfg.data.packing))
    tokenizer = load_tokenizer(cfg.model)
    tasks = build_tasks(data, cfg.seed, tokenizer)  # the tokenizer picks data.prompt_template=auto's template
    size = cfg.trainer.micro_batch_size
    stream = BatchStream(tasks, tokenizer, data, batch_size=size * world_size, seed=cfg.seed)
    steps_forwards = []
    for _ in range(steps):
        forwards = []
        for _ in range(cfg.trainer.grad_accum):
            batch = stream.next_batch()
            forwards += [{k: v[r * size:(r + 1) * size] for k, v in batch.items()} for r in range(world_size)]
        steps_forwards.append(forwards)
    return steps_forwards, list(tasks)


# -- a run's logged steps ------------------------------------------------------------------------------------
@dataclass
class RecomputedStep:
    objective: StepObjective
    grad_norm: float | None  # None for step 1: the adapter's starting tensors are not saved


def recompute_steps(run_dir: Path, overrides: list[str], spec: AdapterSpec, world_size: int = 1,
                    steps: tuple[int, ...] = (1, 2)) -> tuple[dict[int, RecomputedStep], list[str]]:
    """({step: recomputed}, task names) for a run of ``overrides`` (the run's whole command line) on
    ``world_size`` processes. Step 1 starts where B = 0: the plain model. A later step s starts from the
    adapter the run saved after step s - 1 (``checkpoints/step_<s-1>``)."""
    from malora_train.cli import compose
    from malora_train.models import load_model

    cfg = compose(overrides)
    model = load_model(cfg.model, seed=cfg.seed).double().eval()
    forwards, task_names = training_forwards(cfg, max(steps), world_size)
    results = {}
    for step in steps:
        if step == 1:
            with torch.no_grad():
                results[step] = RecomputedStep(step_objective(model, None, forwards[0]), None)
            continue
        saved = Path(run_dir) / "checkpoints" / f"step_{step - 1}" / "adapter" / "adapter_model.safetensors"
        tensors = read_adapter_file(saved)
        for layer in tensors.values():
            for tensor in layer.values():
                tensor.requires_grad_()
        equations = Equations(model, spec, tensors)
        try:
            objective = step_objective(model, equations, forwards[step - 1])
            results[step] = RecomputedStep(objective, grad_norm(objective.loss, tensors))
        finally:
            equations.remove()
    return results, task_names


def assert_logged_step(logged: dict, expected: RecomputedStep, task_names: list[str], rel: float = 1e-5,
                       norm_rel: float = 1e-5) -> None:
    """One line of metrics.jsonl against its recomputed step: lm_loss and loss/<task>; from a saved
    adapter also the auxiliary loss, the balance loss (mixtures), the total loss and the gradient norm."""
    step, objective = logged["step"], expected.objective
    assert logged["lm_loss"] == pytest.approx(objective.lm_loss.item(), rel=rel), f"lm_loss at step {step}"
    expected_tasks = {f"loss/{task_names[t]}": loss for t, loss in objective.task_loss.items()}
    logged_tasks = {k: v for k, v in logged.items() if k.startswith("loss/")}
    assert logged_tasks == pytest.approx(expected_tasks, rel=rel), f"per-task losses at step {step}"
    if expected.grad_norm is None:
        return
    assert logged["aux_loss"] == pytest.approx(objective.aux.item(), rel=rel), f"aux_loss at step {step}"
    if "balance_loss" in logged:
        assert logged["balance_loss"] == pytest.approx(objective.balance.item(), rel=rel), f"step {step}"
    assert logged["loss"] == pytest.approx(objective.loss.item(), rel=rel), f"loss at step {step}"
    assert logged["grad_norm"] == pytest.approx(expected.grad_norm, rel=norm_rel), f"grad_norm at step {step}"
