"""Answer slots that only grow (``labels.answer_slots``): on a GPU the LM head's K settles on one value in
a run's first step or two (one CUDA graph instead of one per K bucket), and the padding slots change
nothing: the losses, per-task sums and gradients are those of exactly the answer positions."""

from __future__ import annotations

import pytest
import torch

from malora_train.labels import IGNORE_INDEX, LOSS_KEYS, answer_slots, loss_targets, pad_loss_targets

# -- answer_slots --------------------------------------------------------------------------------------------

def test_answer_slots_grow_with_headroom_rounded_to_the_multiple_and_never_shrink() -> None:
    assert answer_slots(237, 0, 256) == 512  # 237 x 1.5 = 355.5 -> 512
    assert answer_slots(100, 0, 256) == 256  # 150 -> 256
    assert answer_slots(287, 512, 256) == 512  # fits: unchanged
    assert answer_slots(512, 512, 256) == 512
    assert answer_slots(513, 512, 256) == 1024  # 769.5 -> 1024
    assert answer_slots(10, 512, 256) == 512  # never shrinks
    assert answer_slots(0, 0, 64) == 0
    assert answer_slots(177, 0, 64) == 320  # 265.5 -> 320
    assert answer_slots(100, 0, 64, headroom=1.0) == 128
    assert answer_slots(128, 0, 64, headroom=1.0) == 128
    # the 7B sequence of the benchmark: one value from the first micro-batch on
    slots, seen = 0, []
    for count in (237, 204, 232, 234, 287, 230, 231, 152, 236, 237, 286, 259):
        slots = answer_slots(count, slots, 256)
        seen.append(slots)
    assert set(seen) == {512}


def test_answer_slots_of_multiple_one_are_the_exact_count() -> None:
    """The CPU (multiple 1): no headroom, no growth, as before."""
    assert answer_slots(237, 0, 1) == 237
    assert answer_slots(10, 512, 1) == 10
    assert answer_slots(0, 3, 1) == 0


# -- pad_loss_targets ----------------------------------------------------------------------------------------

def _labels() -> tuple[torch.Tensor, torch.Tensor]:
    labels = torch.full((3, 8), IGNORE_INDEX)
    labels[0, 3:6] = torch.tensor([11, 12, 13])
    labels[2, 5:8] = torch.tensor([21, 22, 23])
    return labels, torch.tensor([1, 0, 2])


def test_loss_targets_pads_to_an_exact_size_with_slots_that_carry_no_loss() -> None:
    labels, tasks = _labels()
    exact = loss_targets(labels, tasks)
    assert exact["loss_index"].numel() == 6
    padded = pad_loss_targets(exact, 10)
    assert set(padded) == set(LOSS_KEYS)
    for key in LOSS_KEYS:
        assert padded[key].shape == (10,)
        assert torch.equal(padded[key][:6], exact[key])
    assert (padded["loss_target"][6:] == IGNORE_INDEX).all()
    assert not padded["loss_index"][6:].any() and not padded["loss_row"][6:].any()
    assert not padded["loss_task"][6:].any()
    same = pad_loss_targets(exact, 6)
    assert all(torch.equal(same[k], exact[k]) for k in LOSS_KEYS)
    assert pad_loss_targets(exact, 7)["loss_index"].numel() == 7  # an exact size, not a multiple


def test_loss_targets_refuses_a_size_smaller_than_the_answers() -> None:
    labels, tasks = _labels()
    with pytest.raises(ValueError, match="6 answer positions do not fit in 5 slots"):
        pad_loss_targets(loss_targets(labels, tasks), 5)


# -- the trainer ---------------------------------------------------------------------------------------------

STEPS = 6
RUN = ["data.packing=true", "adapter=malora", "adapter.router.z_loss_coef=0.001", "adapter.dropout=0",
       f"trainer.max_steps={STEPS}", "trainer.grad_accum=2", "trainer.warmup_ratio=0"]


def _train(cfg, run_dir, multiple: int | None):
    """STEPS steps of a tiny Trainer (``_loss_multiple`` forced where given): each step's metrics, each
    micro-batch's (answer count, K), the trainable weights after, and the trainer."""
    from accelerate.state import AcceleratorState, GradientState

    from malora_train.train.loop import Trainer

    try:
        trainer = Trainer(cfg, run_dir, "", [])
        if multiple is not None:
            trainer._loss_multiple = multiple
        local_batch, shapes = trainer._local_batch, []

        def watched(batch):
            host = local_batch(batch)
            answers = int((host["loss_target"] != IGNORE_INDEX).sum())
            shapes.append((answers, {host[key].numel() for key in LOSS_KEYS}))
            return host

        trainer._local_batch = watched
        trainer.engine.train()
        metrics, seen_keys = [], []
        for _ in range(STEPS):
            trainer.train_step()
            metrics.append(trainer.window.read(lambda t: t, 1, True)[0])
            if trainer.graphs is not None:
                seen_keys.append(set(trainer.graphs._seen))
        weights = [p.detach().clone() for p in trainer.trainable]
        return metrics, shapes, weights, trainer, seen_keys
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _assert_same_training(padded, exact) -> None:
    for step, (ours, theirs) in enumerate(zip(padded[0], exact[0], strict=True), 1):
        for key, value in theirs.items():
            if key in ("tokens_per_s", "step_time_s"):
                continue
            assert ours[key] == pytest.approx(value, rel=1e-6, abs=1e-7), (step, key)
    for ours, theirs in zip(padded[2], exact[2], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


def test_the_trainers_answer_slots_settle_on_one_k_and_change_no_loss(tmp_path, tiny_training_overrides,
                                                                       monkeypatch) -> None:
    """With a GPU's multiple (forced here on the CPU, also on a GPU machine) every micro-batch after the first
    step has the same K while its answer count varies (today's rounding to a multiple would give several K),
    and the losses, per-task losses and trained weights are those of the CPU's exact K."""
    from malora_train.cli import compose

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")

    cfg = compose([*tiny_training_overrides, *RUN])
    exact = _train(cfg, tmp_path / "exact", None)
    assert exact[3]._loss_multiple == 1
    assert all(answers == k for answers, (k,) in exact[1])  # the CPU pads nothing
    padded = _train(cfg, tmp_path / "padded", 64)

    counts = [answers for answers, _ in padded[1]]
    assert counts == [answers for answers, _ in exact[1]]  # the same micro-batches
    assert len(padded[1]) == 2 * STEPS
    assert all(len(k) == 1 for _, k in padded[1])  # every loss tensor of a micro-batch has K entries
    later = {next(iter(k)) for _, k in padded[1][2:]}  # after the first step (two micro-batches)
    assert len(later) == 1 and later.pop() % 64 == 0
    # the test has teeth: the answer counts span several multiples of 64
    assert len(set(counts)) > 1 and len({-(-c // 64) for c in counts}) > 1
    assert padded[3]._answer_slots >= max(counts)
    _assert_same_training(padded, exact)
    assert any(key.startswith("loss/") for key in padded[0][0])


def test_graphed_steps_see_one_input_shape_after_the_first_step(tmp_path, tiny_training_overrides,
                                                               monkeypatch, captured_on_cpu) -> None:
    """The graphed step's path (``trainer.cuda_graphs``, lifted onto the CPU where nothing is captured,
    its multiple forced down to 64 so the tiny model's K would otherwise vary): ``StepGraphs`` sees no new
    set of input shapes after the first step, and trains as the eager CPU step does."""
    from malora_train.cli import compose

    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    graphed = _train(compose([*tiny_training_overrides, *RUN, "trainer.cuda_graphs=true"]),
                     tmp_path / "graphed", 64)
    keys = graphed[4]
    assert len(keys[0]) == 1 and all(later == keys[0] for later in keys[1:])  # one shape: one graph
    exact = _train(compose([*tiny_training_overrides, *RUN, "trainer.cuda_graphs=false"]), tmp_path / "exact",
                   None)
    _assert_same_training(graphed, exact)
