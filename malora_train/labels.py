"""The label convention shared by the data stage and the models: positions labelled ``IGNORE_INDEX``
(prompt, padding) carry no loss (PyTorch's ``cross_entropy`` default ``ignore_index``), and the token at
position j is predicted from the hidden state at j - 1.

``loss_targets`` lists the positions that do carry a loss, so the LM head runs only there. The trainer
computes them on the host from the batch it is about to copy to the device (no device synchronisation,
unlike a boolean mask taken on the device); a forward given only ``labels`` computes them itself.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100
LOSS_KEYS = ("loss_index", "loss_target", "loss_row", "loss_task")


def loss_targets(labels: torch.Tensor, task_ids: torch.Tensor | None = None,
                 multiple: int = 1) -> dict[str, torch.Tensor]:
    """The (K,) tensors of a batch's answer positions, K padded up to a multiple of ``multiple`` (fewer
    distinct shapes) with slots whose target is IGNORE_INDEX:

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
    pad = -rows.numel() % max(1, multiple)
    if pad:
        fill = {"loss_index": 0, "loss_target": IGNORE_INDEX, "loss_row": 0, "loss_task": 0}
        found = {key: torch.cat([value, value.new_full((pad,), fill[key])]) for key, value in found.items()}
    return found
