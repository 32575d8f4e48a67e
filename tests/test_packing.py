"""Sequence packing: the packed stream (whole examples, fixed shapes, exact resume), the document-causal
masks, and the equivalence that makes it safe: packed rows give every example the loss, the gradients
and the routing it gets alone in a padded row."""

from __future__ import annotations

import json
import random

import pytest
import torch
from adapter_specs import kind_config
from torch.nn.attention.flex_attention import create_mask

from malora_train.adapters import AdaptedCausalLM
from malora_train.attention import document_causal_block_mask, document_causal_dense_mask
from malora_train.config import DataConfig
from malora_train.data import BatchStream, Collator, build_tasks
from malora_train.data.packing import pack_rows
from malora_train.eval.routing import start_recording, stop_recording
from malora_train.labels import IGNORE_INDEX, loss_targets

LENGTH = 256


@pytest.fixture(scope="module")
def tasks():
    return build_tasks(DataConfig(source="synthetic", train_per_task=60, eval_per_task=4,
                                  prompt_template="plain"),
                       seed=0)


def packed_stream(tasks, tokenizer, seed=0, rows=4) -> BatchStream:
    return BatchStream(tasks, tokenizer, DataConfig(packing=True, max_length=LENGTH, cache=False),
                       batch_size=rows, seed=seed)


# -- the stream ---------------------------------------------------------------------------------------------

def test_packed_rows_hold_whole_examples_in_draw_order(tasks, tiny_tokenizer) -> None:
    stream = packed_stream(tasks, tiny_tokenizer)
    reference = packed_stream(tasks, tiny_tokenizer)  # the same draws, one at a time
    fill = []
    for _ in range(15):
        batch = stream.next_batch()
        assert {k: v.shape for k, v in batch.items()} == {k: (4, LENGTH) for k in batch}  # fixed shapes
        fill.append(batch["attention_mask"].float().mean().item())
        for row in range(4):
            docs, real = batch["document_ids"][row], batch["attention_mask"][row].bool()
            assert (docs.diff() >= 0).all()  # documents laid one after another, the tail last
            for doc in docs.unique().tolist():
                where = (docs == doc).nonzero().flatten()
                positions = batch["position_ids"][row, where]
                assert torch.equal(positions, torch.arange(where.numel()))  # each segment restarts at 0
                if not real[where].any():
                    assert doc == docs.max()  # the padding tail: the row's last segment
                    continue
                assert real[where].all()
                ids, labels = batch["input_ids"][row, where], batch["labels"][row, where]
                task = batch["task_ids"][row, where]
                assert (task == task[0]).all()
                # one whole example: its prompt masked, then its answer and EOS
                answer = (labels != IGNORE_INDEX).nonzero().flatten()
                assert answer.numel() and torch.equal(answer, torch.arange(answer[0], where.numel()))
                assert torch.equal(labels[answer], ids[answer]) and ids[-1] == tiny_tokenizer.eos_token_id
    assert min(fill) > 0.5 and sum(fill) / len(fill) > 0.7  # ~100-token examples in 256-token rows
    # draw order: the examples of the packed batches are the mixture's draws, none lost, none repeated
    drawn = [reference.mixture.draw() for _ in range(200)]
    laid = []
    for batch_rows in _rows_of(packed_stream(tasks, tiny_tokenizer), 15):
        laid += batch_rows
    assert sorted(laid) == sorted(drawn[:len(laid)])


def _rows_of(stream: BatchStream, batches: int) -> list[list[tuple[int, int]]]:
    """The (task, index) draws each packed batch holds, from the stream's own filler."""
    from malora_train.data.packing import fill_rows

    carry, out = None, []
    for _ in range(batches):
        rows, carry = fill_rows(stream.batch_size, stream.max_length, carry, stream.mixture.draw,
                                stream._length_of)
        out.append([draw for row in rows for draw in row])
    return out


def test_packed_stream_resumes_exactly_with_the_carried_example(tasks, tiny_tokenizer) -> None:
    reference = packed_stream(tasks, tiny_tokenizer)
    expected = [reference.next_batch() for _ in range(12)]
    first = packed_stream(tasks, tiny_tokenizer)
    for _ in range(5):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    assert state["carry"] is not None  # the example the fifth batch had no room for
    resumed = packed_stream(tasks, tiny_tokenizer)
    resumed.load_state_dict(state)
    for i in range(5, 12):
        got = resumed.next_batch()
        assert all(torch.equal(got[k], expected[i][k]) for k in got)


def test_a_batch_of_blocks_is_what_one_process_packs_in_as_many_micro_batches(tasks, tiny_tokenizer) -> None:
    """Rank r of N takes block r of each global packed batch: the N blocks are the N consecutive packed
    micro-batches of one process with grad_accum=N (same rows, same tensors), and epochs count alike."""
    config = DataConfig(packing=True, max_length=LENGTH, cache=False)
    global_stream = BatchStream(tasks, tiny_tokenizer, config, batch_size=8, seed=3, blocks=2)
    one_process = BatchStream(tasks, tiny_tokenizer, config, batch_size=4, seed=3)
    for _ in range(12):
        both = global_stream.next_batch()
        first, second = one_process.next_batch(), one_process.next_batch()
        for key, value in both.items():
            assert torch.equal(value, torch.cat([first[key], second[key]])), key
    assert global_stream.batches_for_epochs(1.0) * 2 in (one_process.batches_for_epochs(1.0),
                                                         one_process.batches_for_epochs(1.0) + 1)


def test_epochs_count_packed_batches(tasks, tiny_tokenizer) -> None:
    stream = packed_stream(tasks, tiny_tokenizer)
    batches = stream.batches_for_epochs(1.0)
    for _ in range(batches):
        stream.next_batch()
    consumed = sum(round(e * 60) for e in stream.mixture.epochs.values()) - (stream._carry is not None)
    assert consumed >= stream.train_size  # one epoch's examples went into that many batches ...
    assert consumed - stream.train_size < 4 * LENGTH // 16  # ... and hardly more (less than one batch)


def test_packing_and_length_grouping_do_not_mix(tasks, tiny_tokenizer) -> None:
    from malora_train.errors import ConfigError

    with pytest.raises(ConfigError, match="data.packing=true and data.group_by_length=true"):
        BatchStream(tasks, tiny_tokenizer, DataConfig(packing=True, group_by_length=True), batch_size=2,
                    seed=0)


# -- the masks ----------------------------------------------------------------------------------------------

def random_documents(batch: int, length: int, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    rows = []
    for _ in range(batch):
        row, doc = [], 0
        while len(row) < length:
            row += [doc] * rng.choice([1, 3, 17, 60, 128, 129, 300])
            doc += 1
        rows.append(row[:length])
    return torch.tensor(rows)


@pytest.mark.parametrize("length", [256, 300, 1000])
def test_block_mask_is_the_document_causal_mask(length: int) -> None:
    """Token by token (full blocks taken whole, partial ones through the mask function, the rest skipped)
    the BlockMask equals the dense mask; and no skipped block holds an allowed pair, no full one a banned."""
    documents = random_documents(3, length, seed=length)
    dense = document_causal_dense_mask(documents)
    mask = document_causal_block_mask(documents)
    block = mask.BLOCK_SIZE[0]
    blocks = -(-length // block)

    def token_level(block_level: torch.Tensor) -> torch.Tensor:
        return (block_level.repeat_interleave(block, -2).repeat_interleave(block, -1)[..., :length, :length]
                .bool())

    full = torch.zeros(3, 1, blocks, blocks, dtype=torch.bool)
    partial = torch.zeros_like(full)
    for b in range(3):
        for q in range(blocks):
            partial[b, 0, q, mask.kv_indices[b, 0, q, :mask.kv_num_blocks[b, 0, q]].long()] = True
            full[b, 0, q, mask.full_kv_indices[b, 0, q, :mask.full_kv_num_blocks[b, 0, q]].long()] = True
    assert not (full & partial).any()
    by_function = create_mask(mask.mask_mod, 3, 1, length, length, device="cpu")
    computed = token_level(full) | (token_level(partial) & by_function)
    assert torch.equal(computed, dense)
    assert dense[token_level(full)].all()  # full blocks need no mask
    assert not dense[~token_level(full | partial)].any()  # skipped blocks hold nothing


# -- packed == padded, example by example -------------------------------------------------------------------

def packed_and_padded(tasks, tokenizer, count: int = 10):
    stream = packed_stream(tasks, tokenizer)
    draws = [stream.mixture.draw() for _ in range(count)]
    padded = Collator(tokenizer.pad_token_id)([stream.splits[t].example(i) for t, i in draws])
    half = count // 2
    rows = [[stream.splits[t].packed(i) for t, i in draws[:half]],
            [stream.splits[t].packed(i) for t, i in draws[half:]]]
    longest = max(sum(ids.numel() for ids, _, _ in row) for row in rows)
    packed = pack_rows(rows, longest + 5, tokenizer.pad_token_id)  # a padding tail in each row
    return padded, packed


def run_model(model: AdaptedCausalLM, batch: dict[str, torch.Tensor]):
    batch = {**batch, **loss_targets(batch["labels"], batch["task_ids"])}
    model.zero_grad(set_to_none=True)
    out = model(**{k: v for k, v in batch.items() if k != "labels"})
    (out.lm_loss + out.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("kind", ["lora", "malora", "molora"])
def test_packed_rows_give_each_example_its_padded_loss_gradients_and_routing(kind, tasks, tiny_tokenizer,
                                                                           make_tiny_model) -> None:
    padded, packed = packed_and_padded(tasks, tiny_tokenizer)
    torch.manual_seed(0)
    cfg = kind_config(kind, rank=4, num_experts=4, dropout=0.0)
    model = AdaptedCausalLM.from_base(make_tiny_model(), cfg).train()
    for param in model.parameters():  # B = 0 at initialisation would hide the adapters from the check
        if param.requires_grad:
            torch.nn.init.normal_(param, std=0.1)
    padded_out, padded_grads = run_model(model, padded)
    packed_out, packed_grads = run_model(model, packed)
    # answer positions come in the same order (examples in draw order, tokens in order)
    torch.testing.assert_close(packed_out.token_loss, padded_out.token_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(packed_out.loss_task, padded_out.loss_task)
    torch.testing.assert_close(packed_out.lm_loss, padded_out.lm_loss, rtol=1e-6, atol=0)
    assert set(packed_grads) == set(padded_grads)
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    if kind == "lora":
        return
    # the routers see the same real tokens (padding excluded in both layouts): the same statistics
    for key in ("aux_loss", "balance_loss", "z_loss", "router_entropy", "layer_balance"):
        torch.testing.assert_close(getattr(packed_out, key), getattr(padded_out, key), rtol=1e-5, atol=1e-7,
                                   msg=key)
    counts = {}
    for name, batch in (("padded", padded), ("packed", packed)):
        start_recording(model, len(tasks))
        with torch.no_grad():
            run = {**batch, **loss_targets(batch["labels"], batch["task_ids"])}
            model.eval()(**{k: v for k, v in run.items() if k != "labels"})
        stop_recording(model)
        counts[name] = model.routing_counts()
    for layer, table in counts["padded"].items():
        real = table[:len(tasks)]
        assert torch.equal(counts["packed"][layer][:len(tasks)], real), layer
    assert sum(t.sum() for t in counts["padded"].values()) > 0


def test_a_training_step_reads_nothing_back_from_the_device(tmp_path, tiny_training_overrides,
                                                            fresh_accelerate_state) -> None:
    """On the CPU there is no device to wait for, so the step is watched instead: no operation that
    needs a value on the host (``.item()``, ``nonzero``, a tensor's truth value) runs in a training step
    outside the host-side data preparation (and the CPU draw of a dropout seed)."""
    import traceback

    from torch.utils._python_dispatch import TorchDispatchMode

    from malora_train.cli import compose
    from malora_train.train.loop import Trainer

    reads = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.is_nonzero.default, torch.ops.aten.equal.default}
    # host data by design: the batch being prepared, the CPU dropout-seed draw, and the optimizer's step
    # counter, which torch keeps on the host for a non-fused AdamW (the GPU runs the fused one)
    host_side = {"_local_batch", "next_batch", "answer_tokens", "real_tokens", "draw_seed", "_get_value"}
    caught: list[str] = []

    class WatchReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in reads:
                frames = [f.name for f in traceback.extract_stack()]
                if not host_side & set(frames):
                    caught.append(f"{func} in {' > '.join(frames[-6:])}")
            return func(*args, **(kwargs or {}))

    for packing in ("true", "false"):
        cfg = compose([*tiny_training_overrides, f"data.packing={packing}", "trainer.max_steps=4",
                       "adapter=malora", "adapter.router.z_loss_coef=0.001"])
        trainer = Trainer(cfg, tmp_path / f"run-{packing}", "", [])
        trainer.engine.train()
        trainer.train_step()  # the first step builds optimizer state
        with WatchReads():
            trainer.train_step()
            trainer.train_step()
        assert not caught, caught[:3]
        metrics, nonfinite, _ = trainer.window.read(lambda t: t, 1, True)  # the window's one read
        assert nonfinite == 0 and metrics["lm_loss"] > 0
