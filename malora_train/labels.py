"""The label convention shared by the data stage and the models: positions labelled ``IGNORE_INDEX``
(prompt, padding) carry no loss (PyTorch's ``cross_entropy`` default ``ignore_index``), and the token at
position j is predicted from the hidden state at j - 1.

``loss_targets`` lists the positions that do carry a loss, so the LM head runs only there. The trainer
computes them on the host from the batch it is about to copy to the device (no device synchronisation,
unlike a boolean mask taken on the device); a forward given only ``labels`` computes them itself.
"""

from __future__ import annotations

import math

import torch

IGNORE_INDEX = -100
LOSS_KEYS = ("loss_index", "loss_target", "loss_row", "loss_task")


def answer_slots(count: int, current: int, multiple: int, headroom: float = 1.5) -> int:
    """How many answer slots (K, the LM head's rows) a micro-batch with ``count`` answer positions gets,
    given the ``current`` slot count: ``current`` while it holds them, else ``count * headroom`` rounded up
    to ``multiple``.

    The slots only grow, with headroom, so the LM head's shapes settle on one K within a run's first steps:
    under ``trainer.cuda_graphs`` every new K costs an eager step and a capture (counted against
    ``max_graphs``), and a count wandering across a multiple would keep costing them. Padding slots are
    ``IGNORE_INDEX`` targets: they add nothing to the loss, the per-task sums, the counts or the gradients.
    ``multiple`` 1 (the CPU) keeps the exact count: no headroom, no growth.
    """
    if multiple <= 1:
        return count
    if count <= current:
        return current
    return -(-math.ceil(count * headroom) // multiple) * multiple


def loss_targets(labels: torch.Tensor, task_ids: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The (K,) tensors of a batch's answer positions (``pad_loss_targets`` pads them to a fixed K):

    - ``loss_index``: flat position ``row * L + col`` of the hidden state that predicts a label,
    - ``loss_target``: the label (the token at ``col + 1``),
    - ``loss_row``: the row, ``loss_task``: the task of the predicted token (``task_ids`` per row (B,)
      or per token (B, L); 0 without).
    """
    length = labels.shape[1]
    following = labels[:, 1:]
    rows, cols = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    if task_ids is None:
        task = torch.zeros_like(rows)
    else:
        task = task_ids[rows] if task_ids.dim() == 1 else task_ids[rows, cols + 1]
    found = {"loss_index": rows * length + cols, "loss_target": following[rows, cols],
             "loss_row": rows, "loss_task": task}
    return found


def pad_loss_targets(found: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """``loss_targets``' tensors padded to exactly ``size`` slots (``answer_slots``; an error when they hold
    more answer positions). A padding slot reads position 0 of row 0 for task 0 and carries no loss: its
    target is IGNORE_INDEX."""
    count = found["loss_index"].numel()
    if count > size:
        raise ValueError(f"{count} answer positions do not fit in {size} slots")
    if count == size:
        return found
    fill = {"loss_index": 0, "loss_target": IGNORE_INDEX, "loss_row": 0, "loss_task": 0}
    return {key: torch.cat([value, value.new_full((size - count,), fill[key])])
            for key, value in found.items()}
