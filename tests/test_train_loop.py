"""The training loop on the tiny model: non-finite losses, run-directory safety, checkpoint retention,
gradient accumulation and checkpointing equivalences, what a run writes, wandb, epochs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_runner import run_program
from safetensors.torch import load_file

from malora_train.adapters import AdaptedCausalLM
from malora_train.errors import ConfigError
from malora_train.eval import EvalResult, TaskScore
from malora_train.run_dir import MANIFEST_FILE, read_json
from malora_train.train.checkpoint.checkpointer import STATE_FILE
from malora_train.train.checkpoint.folders import complete_checkpoints
from malora_train.train.loop import NonFiniteLoss, Trainer

TASKS = ["sentiment", "category", "case", "compare", "arithmetic"]


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("malora-train:")]


def nan_at_training_forward(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """The ``call``-th training forward (1-based) returns a NaN loss, as a diverging run would."""
    original = AdaptedCausalLM.forward
    calls = [0]

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] == call:
                nan = torch.tensor(float("nan"))
                return dataclasses.replace(out, loss=out.loss * nan, lm_loss=out.lm_loss * nan,
                                           seq_loss_sum=out.seq_loss_sum * nan,
                                           token_loss=out.token_loss * nan)
        return out

    monkeypatch.setattr(AdaptedCausalLM, "forward", forward)


# -- non-finite loss ---------------------------------------------------------------------------------------
def test_nan_loss_stops_the_run_naming_the_step_and_the_last_good_checkpoint(tmp_path, monkeypatch, capsys,
                                                                            tiny_training_overrides):
    run_dir = tmp_path / "run"
    nan_at_training_forward(monkeypatch, 5)
    code = run_program(monkeypatch, "malora-train", [*tiny_training_overrides, "trainer.max_steps=8",
                                                     "trainer.save_every=2", f"hydra.run.dir={run_dir}"])
    assert code == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line.startswith(f"malora-train: error: non-finite loss at step 5; last good checkpoint: "
                           f"{run_dir / 'checkpoints' / 'step_4'} (")
    assert "trainer.skip_nonfinite=true" in line
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2, 4]
    assert not (run_dir / "summary.json").exists()


def test_nan_loss_before_any_checkpoint_says_so(tmp_path, monkeypatch, run_training):
    nan_at_training_forward(monkeypatch, 1)
    with pytest.raises(NonFiniteLoss, match=r"^non-finite loss at step 1; no checkpoint was saved yet"):
        run_training(tmp_path / "run", "trainer.max_steps=3")


def test_skip_nonfinite_skips_the_step_and_finishes(tmp_path, monkeypatch, run_training, read_metrics):
    run_dir = tmp_path / "run"
    nan_at_training_forward(monkeypatch, 5)
    summary = run_training(run_dir, "trainer.max_steps=8", "trainer.save_every=8",
                           "trainer.skip_nonfinite=true")
    assert summary["status"] == "completed" and summary["steps"] == 8
    rows = {r["step"]: r for r in read_metrics(run_dir) if "lm_loss" in r}
    assert [s for s, r in rows.items() if r.get("skipped")] == [5]
    assert rows[5]["loss"] == "nan"
    assert all(isinstance(rows[s]["loss"], float) for s in rows if s != 5)
    # the skipped step changed nothing: AdamW took 7 steps in 8, and every weight is finite
    optimizer = load_file(str(run_dir / "checkpoints" / "step_8" / "optimizer.safetensors"))
    assert {float(v) for k, v in optimizer.items() if k.endswith(".step")} == {7.0}
    weights = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


# -- a run never overwrites another ------------------------------------------------------------------------
def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_an_existing_run_dir_without_resume_is_refused_and_left_untouched(tmp_path, monkeypatch, capsys,
                                                                          tiny_training_overrides,
                                                                          run_training):
    run_dir = tmp_path / "run"
    argv = [*tiny_training_overrides, "trainer.max_steps=2", "trainer.save_every=2",
            f"hydra.run.dir={run_dir}"]
    assert run_program(monkeypatch, "malora-train", argv) == 0
    before = snapshot(run_dir)
    hydra_files = {".hydra/config.yaml", ".hydra/overrides.yaml", "cli.log"}
    assert hydra_files | {"config.yaml", "metrics.jsonl", "summary.json"} <= set(before)
    capsys.readouterr()

    assert run_program(monkeypatch, "malora-train", [*argv, "adapter=lora"]) == 2
    [line] = error_lines(capsys.readouterr().err)
    assert line == (f"malora-train: error: hydra.run.dir={run_dir} already holds a run (config.yaml, "
                    "metrics.jsonl, summary.json, adapter, checkpoints); set trainer.resume=auto to continue "
                    "it or choose another hydra.run.dir")
    assert snapshot(run_dir) == before  # not even Hydra's .hydra/ files or its log were touched

    with pytest.raises(ConfigError, match="already holds a run"):  # train() callers are guarded too
        run_training(run_dir, "trainer.max_steps=2")
    assert snapshot(run_dir) == before


# -- checkpoints kept ---------------------------------------------------------------------------------------
def test_keeps_the_last_checkpoints_and_the_best(tmp_path, monkeypatch, run_training):
    def scripted_evaluate(self: Trainer, record_routing: bool = False) -> EvalResult:
        correct = 9 if self.state.step == 2 else 1  # the eval at step 2 is the best of the run
        return EvalResult({task: TaskScore(correct, 10) for task in self.task_names})

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    run_dir = tmp_path / "run"
    summary = run_training(run_dir, "trainer.max_steps=8", "trainer.save_every=2", "trainer.keep_last=2",
                           "trainer.eval_every=2")
    assert summary["best_step"] == 2 and summary["best_eval_average"] == 90.0
    assert [step for step, _ in complete_checkpoints(run_dir)] == [2, 6, 8]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2", "step_6", "step_8"]
    for step, path in complete_checkpoints(run_dir):
        files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
        assert files == {"adapter/adapter_config.json", "adapter/adapter_model.safetensors", "optimizer.json",
                         "optimizer.safetensors", "rng_rank0.json", "rng_rank0.safetensors", STATE_FILE,
                         MANIFEST_FILE}
        state = read_json(path / STATE_FILE)
        assert state["train"]["step"] == step
        assert state["scheduler"]["last_epoch"] == step
        assert state["stream"]["batches"] == step and sum(state["stream"]["mixture"]["drawn"]) == 4 * step
        assert state["world_size"] == 1


def test_a_new_best_is_saved_between_regular_checkpoints(tmp_path, monkeypatch, run_training):
    def scripted_evaluate(self: Trainer, record_routing: bool = False) -> EvalResult:
        correct = {3: 5, 6: 9}.get(self.state.step, 1)
        return EvalResult({task: TaskScore(correct, 10) for task in self.task_names})

    monkeypatch.setattr(Trainer, "evaluate", scripted_evaluate)
    run_dir = tmp_path / "run"
    run_training(run_dir, "trainer.max_steps=10", "trainer.save_every=4", "trainer.keep_last=1",
                 "trainer.eval_every=3")
    # saves at 3 (best), 4, 6 (best), 8 and at the end (10, before the final evaluation); kept: the last
    # one and the best
    assert [step for step, _ in complete_checkpoints(run_dir)] == [6, 10]


# -- equivalences --------------------------------------------------------------------------------------
def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_gradient_accumulation_matches_one_larger_micro_batch(tmp_path, run_training, train_losses):
    # no dropout (its masks depend on the micro-batch shapes) and no balance loss (a per-forward statistic:
    # two forwards of 2 rows do not have the balance loss of one forward of 4); routing itself stays on
    common = ["adapter=malora", "adapter.dropout=0", "adapter.router.balance_coef=0", "trainer.max_steps=6"]
    whole = run_training(tmp_path / "whole", *common, "trainer.micro_batch_size=4")
    accumulated = run_training(tmp_path / "accum", *common, "trainer.micro_batch_size=2",
                               "trainer.grad_accum=2")
    assert whole["tokens"] == accumulated["tokens"]
    for key in ("loss", "grad_norm", "lr"):
        expected = train_losses(tmp_path / "whole", key)
        got = train_losses(tmp_path / "accum", key)
        assert list(got) == list(range(1, 7))
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-7), key
    a, b = adapter_weights(tmp_path / "whole"), adapter_weights(tmp_path / "accum")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)
    assert any(a[key].abs().max() > 0 for key in a if key.endswith("lora_B.weight"))  # it did train


@pytest.mark.parametrize("setting", ["true", "selective"])
def test_gradient_checkpointing_gives_the_same_losses(setting, tmp_path, run_training, train_losses):
    common = ["adapter=malora", "adapter.dropout=0.05", "trainer.max_steps=5"]
    run_training(tmp_path / "plain", *common)
    run_training(tmp_path / "checkpointed", *common, f"trainer.gradient_checkpointing={setting}")
    for key in ("loss", "aux_loss", "grad_norm"):
        assert train_losses(tmp_path / "checkpointed", key) == pytest.approx(
            train_losses(tmp_path / "plain", key), rel=1e-6, abs=1e-8), key
    a, b = adapter_weights(tmp_path / "plain"), adapter_weights(tmp_path / "checkpointed")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)


# -- what a run writes --------------------------------------------------------------------------------
def test_a_run_writes_metrics_summary_config_and_plot(tmp_path, monkeypatch, capsys, tiny_training_overrides,
                                                      read_metrics):
    run_dir = tmp_path / "run"
    argv = [*tiny_training_overrides, "adapter=malora", "trainer.max_steps=4", "trainer.eval_before=true",
            "trainer.eval_every=2", "trainer.lr=0.002", "trainer.warmup_ratio=0.5", "trainer.progress=true",
            f"hydra.run.dir={run_dir}"]
    assert run_program(monkeypatch, "malora-train", argv) == 0
    out, err = capsys.readouterr()

    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "lm_loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    required = {"step", "loss", "lm_loss", "aux_loss", "lr", "tokens_per_s", "step_time_s", "grad_norm",
                "balance_loss", "router_entropy", "balance/layer_0", "balance/layer_1"}
    required |= {f"tokens/{t}" for t in TASKS} | {f"epoch/{t}" for t in TASKS}
    for row in train_rows:
        assert required <= set(row), required - set(row)
        per_task = [k for k in row if k.startswith("loss/")]
        assert per_task and all(row[f"tokens/{k[5:]}"] > 0 for k in per_task)
        assert row["loss"] == pytest.approx(row["lm_loss"] + row["aux_loss"])
        assert row["aux_loss"] == pytest.approx(0.01 * row["balance_loss"])
    # transformers' linear schedule: warm-up from 0 over ceil(0.5 * 4) = 2 steps, then linear decay; each
    # line has the lr its step used
    assert [r["lr"] for r in train_rows] == pytest.approx([0.0, 0.001, 0.002, 0.001])
    assert [r["step"] for r in rows if "eval/average" in r] == [0, 2, 4]
    assert all({f"eval/{t}" for t in TASKS} <= set(r) for r in rows if "eval/average" in r)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"status", "steps", "tokens", "wall_time_s", "train_time_s", "tokens_per_s", "peak_memory_gb",
            "trainable_params", "eval_before", "eval_after", "eval_after_average", "best_eval_average",
            "best_step", "adapter_dir", "world_size", "expert_share", "mixed_precision"} <= set(summary)
    assert summary["steps"] == 4 and summary["status"] == "completed" and summary["mixed_precision"] == "no"
    assert summary["tokens"] == sum(sum(r[f"tokens/{t}"] for t in TASKS) for r in train_rows)
    assert summary["wall_time_s"] >= summary["train_time_s"] > 0 and summary["peak_memory_gb"] > 0
    assert 0 < summary["startup_s"] < 60  # the set-up: model, adapters, data, optimizer
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["trainer"]["max_steps"] == 4 and config["model"]["name"] == "tiny"
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "routing.json").is_file()
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()
    # the console: a progress bar with loss, aux loss, lr and tokens/s, then the final summary
    assert all(f"{key}=" in err for key in ("loss", "aux", "lr", "tok_s"))
    assert "== tiny + malora: 4 steps" in out and "tokens/s" in out and "peak memory" in out
    assert "best eval average" in out


def test_epochs_set_the_number_of_steps_when_max_steps_is_0(tmp_path, run_training, read_metrics):
    # 5 tasks x 8 examples, global batch 4: half an epoch is 5 steps
    summary = run_training(tmp_path / "run", "data.train_per_task=8", "trainer.max_steps=0",
                           "trainer.epochs=0.5")
    assert summary["steps"] == 5
    last = [r for r in read_metrics(tmp_path / "run") if "lm_loss" in r][-1]
    assert sum(last[f"epoch/{t}"] * 8 for t in TASKS) == 20  # 20 examples drawn


def test_bad_trainer_settings_fail_at_start(tmp_path, run_training):
    for override in ("trainer.keep_last=0", "trainer.save_every=-1", "trainer.grad_accum=0",
                     "logger.wandb.mode=loud"):
        key = override.split("=")[0]
        with pytest.raises(ConfigError, match=key):
            run_training(tmp_path / "run", "trainer.save_every=2", override)
        assert not (tmp_path / "run" / "metrics.jsonl").exists()


# -- wandb ---------------------------------------------------------------------------------------------------
def bytes_once_written(path: Path, needles: list[bytes], timeout: float = 60.0) -> bytes:
    """The file once it holds every needle (or after ``timeout``): wandb's service process may still be
    writing the offline run after ``finish()`` has returned (reading it at once made this test flaky)."""
    import time

    deadline = time.monotonic() + timeout
    while (not all(needle in (data := path.read_bytes()) for needle in needles)
           and time.monotonic() < deadline):
        time.sleep(0.2)
    return data


def test_wandb_offline_logs_locally_with_the_run_name_from_the_overrides(tmp_path, monkeypatch, run_training):
    wandb = pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))
    calls = []
    real_init = wandb.init

    def spy_init(**kwargs):
        calls.append(kwargs)
        return real_init(**kwargs)

    monkeypatch.setattr(wandb, "init", spy_init)
    run_dir = tmp_path / "run"
    try:
        run_training(run_dir, "adapter=lora", "trainer.max_steps=2", "logger.trackers=[wandb]",
                     "logger.wandb.mode=offline", "logger.wandb.tags=[smoke,cpu]")
    except Exception as err:  # pragma: no cover - a wandb that insists on the network
        if "network" in str(err).lower() or "connect" in str(err).lower():
            pytest.skip(f"wandb tried the network in offline mode: {err}")
        raise
    [kwargs] = calls  # Accelerate's wandb tracker started the run
    assert (kwargs["mode"] == "offline" and kwargs["dir"] == str(run_dir)
            and kwargs["project"] == "malora-train")
    assert kwargs["name"] == "adapter=lora,trainer.max_steps=2"  # logger.* overrides are left out
    assert kwargs["tags"] == ["smoke", "cpu"]
    [offline_run] = list((run_dir / "wandb").glob("offline-run-*"))
    [log_file] = list(offline_run.glob("*.wandb"))
    # the run name, the metrics, the summary and the config (nested: trainer.max_steps)
    expected = [b"adapter=lora,trainer.max_steps=2", b"lm_loss", b"trainable_params", b'{"max_steps":2,']
    logged = bytes_once_written(log_file, expected)
    assert [needle for needle in expected if needle not in logged] == []


def compile_on_aot_eager(monkeypatch, fullgraph: bool) -> list[tuple]:
    """``nn.Module.compile`` on the aot_eager backend (Inductor's code generation takes minutes on a CPU):
    dynamo's trace and AOTAutograd's forward/backward split are the real ones (the GPU test runs inductor).
    Returns the list that records each compiled module's class, mode and ``dynamic``."""
    import torch._dynamo

    compiled = []
    original = torch.nn.Module.compile

    def compile_module(self, **kwargs):
        compiled.append((type(self).__name__, kwargs.get("mode"), kwargs.get("dynamic")))
        original(self, backend="aot_eager", fullgraph=fullgraph, dynamic=False)

    monkeypatch.setattr(torch.nn.Module, "compile", compile_module)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    return compiled


COMPILE_COMMON = ("trainer.max_steps=3", "adapter.dropout=0", "data.packing=true", "data.eval_per_task=2")


@pytest.mark.parametrize("scope", ["layers", "decoder"])
def test_compile_option_runs_the_decoder_through_torch_compile(scope, monkeypatch, run_training, train_losses,
                                                              tmp_path) -> None:
    """trainer.compile=true compiles each decoder layer (or the whole decoder) for the packed training steps
    and trains as eager does; evaluation runs eagerly. With compile_adapters=traced the adapters are part of
    the graph: one graph, no break (fullgraph)."""
    import torch._dynamo

    compiled = compile_on_aot_eager(monkeypatch, fullgraph=True)
    run_training(tmp_path / "compiled", *COMPILE_COMMON, "trainer.compile=true",
                 "trainer.compile_mode=max-autotune", f"trainer.compile_scope={scope}",
                 "trainer.compile_adapters=traced")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    run_training(tmp_path / "eager", *COMPILE_COMMON)
    expected = [("LlamaDecoderLayer", "max-autotune", False)] * 2 if scope == "layers" else [
        ("LlamaModel", "max-autotune", False)]
    assert compiled == expected
    # layers: one graph for the first layer (its input, the frozen embedding, needs no gradient) and one for
    # every other layer, reused at every step; evaluation compiled nothing
    assert graphs == (2 if scope == "layers" else 1)
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)


@pytest.mark.parametrize(("adapter", "setting", "kernels"), [
    ("malora", "kernels", True), ("molora", "kernels", True), ("lora", "kernels", True),
    ("malora", "traced", False), ("malora", "auto", True), ("lora", "auto", False)])
def test_compile_adapters_runs_the_fast_path_between_compiled_pieces(adapter, setting, kernels, monkeypatch,
                                                                     run_training, train_losses,
                                                                     tmp_path) -> None:
    """trainer.compile_adapters=kernels keeps every adapted layer out of the graph: its call breaks the graph
    and runs ``fast_forward`` eagerly, never the composite path; traced compiles the composite path with no
    break; auto (the default) is kernels for a mixture and traced for plain LoRA. Each trains as eager
    does."""
    import torch._dynamo

    from malora_train.adapters import base

    calls = {"fast": 0, "composite": 0}
    for cls in (base.AdapterLinear, base.MixtureAdapterLinear):
        for method, key in (("fast_forward", "fast"), ("composite_forward", "composite")):
            original = getattr(cls, method)

            def counted(self, *args, _original=original, _key=key, **kwargs):
                calls[_key] += 1
                return _original(self, *args, **kwargs)

            monkeypatch.setattr(cls, method, counted)
    compile_on_aot_eager(monkeypatch, fullgraph=False)
    overrides = (*COMPILE_COMMON, f"adapter={adapter}")
    run_training(tmp_path / "compiled", *overrides, "trainer.compile=true",
                 f"trainer.compile_adapters={setting}")
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    compiled_calls = dict(calls)  # the compiled run's (its evaluation runs eagerly: the fast path)
    run_training(tmp_path / "eager", *overrides)
    if kernels:
        assert compiled_calls["composite"] == 0 and compiled_calls["fast"] > 0 and breaks > 0
    else:
        assert compiled_calls["composite"] > 0 and breaks == 0
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-5)


def test_compile_adapters_kernels_runs_on_inductor(run_training, train_losses, tmp_path) -> None:
    """The real compiler, not aot_eager: Inductor compiles the pieces between the adapted layers (seconds on a
    CPU, since the adapters are not in the graphs) and MALoRA trains as eager does."""
    import torch._dynamo

    torch._dynamo.reset()
    overrides = (*COMPILE_COMMON, "adapter=malora")
    run_training(tmp_path / "compiled", *overrides, "trainer.compile=true",
                 "trainer.compile_adapters=kernels")
    run_training(tmp_path / "eager", *overrides)
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), rel=1e-4)


def test_compile_needs_packing(run_training, tmp_path) -> None:
    with pytest.raises(ConfigError, match="trainer.compile=true needs the fixed shapes of data.packing=true"):
        run_training(tmp_path / "run", "trainer.compile=true", "data.packing=false")


def test_progress_auto_writes_plain_lines_to_a_file_and_a_bar_to_a_terminal(tmp_path, monkeypatch, capsys,
                                                                            tiny_training_overrides):
    import io

    from malora_train.train.metrics import Progress, progress_interval, progress_mode

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert progress_mode("auto", Terminal()) == "bar" and progress_mode("auto", io.StringIO()) == "lines"
    assert (progress_mode(True, io.StringIO()), progress_mode(False, Terminal())) == ("bar", "off")
    assert progress_interval(200, 1, None) == 10 and progress_interval(200, 4, None) == 12
    assert progress_interval(7, 10, 3) == 10
    # the earlier signature (enabled or not) still works
    assert Progress(3, 0, True, True).mode == "bar" and Progress(3, 0, False, True).mode == "off"
    capsys.readouterr()

    # the default (auto) with stderr captured, as in a batch job's log file
    argv = [*(o for o in tiny_training_overrides if not o.startswith("trainer.progress")),
            "trainer.max_steps=4",
            "trainer.progress_every=2", "trainer.eval_before=true", f"hydra.run.dir={tmp_path / 'run'}"]
    assert run_program(monkeypatch, "malora-train", argv) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = [line for line in err.splitlines() if line.startswith("train: step ")]
    assert [line.split(",")[0].split()[2] for line in lines] == ["2/4", "4/4"]
    assert all(key in lines[-1] for key in ("loss ", "tokens/s", "ETA "))


def test_bad_progress_settings_fail_at_start(tmp_path, run_training):
    for override in ("trainer.progress=sometimes", "trainer.progress_every=0"):
        with pytest.raises(ConfigError, match=override.split("=")[0]):
            run_training(tmp_path / "run", override)
