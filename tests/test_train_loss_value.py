"""A training step's logged losses against the same step recomputed from scratch (``scratch_model``): the
LM loss and each task's loss are the cross-entropy over the step's answer tokens divided by their count
(padded rows, packed rows, gradient accumulation), the logged gradient norm is that of this objective,
and with a mixture the auxiliary loss is c_bal mean(balance) + c_z mean(z) from the router logits.

Step 1 starts from B = 0: the adapted model is the base model, so its losses are the plain Hugging Face
model's. Step 2 starts from the weights saved after step 1 (``trainer.save_every=1``), which the
equations read from the checkpoint. The reference runs in float64, the run in float32.
(Two processes: ``test_train_distributed.py`` checks a DDP/ZeRO step the same way.)
"""

from __future__ import annotations

import pytest
from scratch_model import AdapterSpec, assert_logged_step, recompute_steps

RUN = ["trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=2", "trainer.warmup_ratio=0",
       "adapter.dropout=0"]
LORA = ["adapter=lora", "adapter.rank=4", "adapter.alpha=8"]
LORA_SPEC = AdapterSpec("lora", scaling=8 / 4)
BATCHING = {
    "padded": [],
    "packed": ["data.packing=true", "data.max_length=512", "trainer.micro_batch_size=2"],  # ~3 examples a row
    "grad_accum": ["trainer.micro_batch_size=2", "trainer.grad_accum=2"],
}
# MALoRA: 4 experts of rank 4 in a shared subspace of 8, top-2, both auxiliary losses on
MALORA = ["adapter=malora", "adapter.num_experts=4", "adapter.shared_rank=8", "adapter.expert_rank=4",
          "adapter.alpha=8", "adapter.router.top_k=2", "adapter.router.balance_coef=0.01",
          "adapter.router.z_loss_coef=0.01"]
MALORA_SPEC = AdapterSpec("malora", scaling=8 / 4, expert_rank=4, num_experts=4, top_k=2,
                          balance_coef=0.01, z_loss_coef=0.01)


@pytest.mark.parametrize("batching", list(BATCHING))
def test_logged_lm_loss_is_the_mean_cross_entropy_of_the_steps_answer_tokens(
        batching, tmp_path, run_training, tiny_training_overrides, read_metrics):
    overrides = [*LORA, *RUN, *BATCHING[batching]]
    run_training(tmp_path / "run", *overrides)
    logged = [row for row in read_metrics(tmp_path / "run") if "lm_loss" in row]
    assert [row["step"] for row in logged] == [1, 2]
    steps, task_names = recompute_steps(tmp_path / "run", [*tiny_training_overrides, *overrides], LORA_SPEC)
    for row in logged:
        assert_logged_step(row, steps[row["step"]], task_names)
    # the comparison has teeth: several tasks, and packed rows hold several examples each
    assert len({task for step in steps.values() for task in step.objective.task_loss}) >= 2
    rows = {"padded": 4, "packed": 2, "grad_accum": 2 * 2}[batching]  # micro-batch x grad_accum
    assert steps[2].objective.examples >= (2 * rows if batching == "packed" else rows)


def test_logged_aux_loss_is_balance_and_z_loss_from_the_router_logits(
        tmp_path, run_training, tiny_training_overrides, read_metrics):
    overrides = [*MALORA, *RUN]
    run_training(tmp_path / "run", *overrides)
    logged = [row for row in read_metrics(tmp_path / "run") if "lm_loss" in row]
    assert [row["step"] for row in logged] == [1, 2]
    steps, task_names = recompute_steps(tmp_path / "run", [*tiny_training_overrides, *overrides], MALORA_SPEC)
    for row in logged:
        # top-2 routing: a float32 near-tie may send a token to the other expert (~1e-4 on the norm)
        assert_logged_step(row, steps[row["step"]], task_names, norm_rel=1e-4)
    objective = steps[2].objective
    # both terms weigh: dropping either moves aux by far more than the tolerance
    assert 0.01 * objective.balance.item() > 0.1 * objective.aux.item()
    assert 0.01 * objective.z.item() > 0.1 * objective.aux.item()
