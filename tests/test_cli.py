"""The commands as a user meets them: ``--help`` pages, one-line errors for everything Hydra rejects, a bad
choice or path found before anything is loaded or written, a run directory's own config under
``malora-eval`` and a resumed ``malora-train`` (the command line on top, shape changes refused), sweep
folder names pasted as they are, a completed run left alone, write failures naming the path."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from cli_runner import run_program
from lock_holder import hold_lock

from malora_train import run_dir as rd
from malora_train.config import Config
from malora_train.train.checkpoint.folders import complete_checkpoints

REPO_ROOT = Path(__file__).resolve().parents[1]


def error_line(capsys, program: str = "malora-train", alone: bool = True) -> str:
    """The one error line on stderr (``alone``: nothing else there, as for an error found before any work;
    else progress bars of the work done before may precede it); no traceback."""
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith(f"{program}: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err == errors[0] or not alone, err
    return errors[0][len(f"{program}: error: "):]


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


TINY = ["model=tiny", "data.train_per_task=16", "data.eval_per_task=4", "data.max_length=256",
        "trainer.micro_batch_size=2", "trainer.progress=false", "trainer.eval_before=false"]
RUN_OVERRIDES = [*TINY, "data.tasks=[sentiment,case]", "adapter=lora", "adapter.rank=4",
                 "trainer.max_steps=4", "trainer.save_every=2"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A completed tiny run (LoRA r=4 on two tasks, checkpoints at 2 and 4), trained through the CLI."""
    from _pytest.monkeypatch import MonkeyPatch

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    patch = MonkeyPatch()
    try:
        assert run_program(patch, "malora-train", [*RUN_OVERRIDES, f"hydra.run.dir={run_dir}"]) == 0
    finally:
        patch.undo()
    return run_dir


# -- --help -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("program", ["malora-train", "malora-eval", "malora-inspect"])
def test_every_command_has_a_help_page_with_groups_options_and_described_keys(monkeypatch, capsys, program):
    assert run_program(monkeypatch, program, ["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {program} ")
    groups = {"malora-train": ["model", "adapter", "data", "trainer"], "malora-eval": ["model", "data"],
              "malora-inspect": ["model", "adapter"]}[program]
    for group in groups:
        options = sorted(p.stem for p in (REPO_ROOT / "conf" / group).glob("*.yaml"))
        [line] = [ln for ln in out.splitlines() if ln.startswith(f"  {group} ")]
        assert [o.rstrip("*") for o in line.split(None, 1)[1].split(", ")] == options
    keys = [ln.split()[0] for ln in out.split("keys (")[1].split("\noptions:")[0].splitlines()[1:]
            if ln.strip()]
    sections = {"malora-train": {"seed", "model", "adapter", "data", "trainer", "eval", "logger"},
                "malora-eval": {"seed", "model", "data", "eval"},
                "malora-inspect": {"model", "adapter", "inspect"}}[program]
    assert {k.split(".")[0].split("[")[0] for k in keys} == sections
    assert "adapter.router.top_k" in keys or program == "malora-eval"
    assert "  --config-dir DIR" in out and "-h, --help" in out


def test_every_schema_key_has_a_description():
    from malora_train.commands.help import key_docs

    docs = key_docs(None)
    assert {"seed", "adapter.rank", "data.custom_tasks[i].prompt_template", "trainer.resume"} <= {
        d.key for d in docs}
    assert [d.key for d in docs if not d.description] == []


def test_help_shows_the_defaults_after_the_default_group_options(monkeypatch, capsys):
    assert run_program(monkeypatch, "malora-train", ["--help"]) == 0
    lines = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")}
    assert lines["trainer.max_steps"][1] == "50"  # conf/trainer/default.yaml, not the schema's 0
    assert lines["adapter.rank"][1:4] == ["8", "expert", "rank"]


def test_help_lists_the_adapter_keys_of_the_chosen_kind(monkeypatch, capsys):
    def adapter_lines() -> dict[str, list[str]]:
        out = capsys.readouterr().out
        return {ln.split()[0]: ln.split() for ln in out.splitlines() if ln.startswith("  adapter.")}

    assert run_program(monkeypatch, "malora-train", ["adapter=lora", "--help"]) == 0
    lines = adapter_lines()
    assert lines["adapter.rank"][1] == "64" and lines["adapter.kind"][1] == "lora"  # conf/adapter/lora.yaml
    assert "adapter.num_experts" not in lines and "adapter.router.top_k" not in lines
    assert run_program(monkeypatch, "malora-inspect", ["adapter=hydralora", "--help"]) == 0
    lines = adapter_lines()
    assert lines["adapter.router.dense"][1] == "True" and "adapter.lam" not in lines


def test_malora_report_has_its_help_page(monkeypatch, capsys):
    assert run_program(monkeypatch, "malora-report", ["--help"]) == 0
    assert "usage: malora-report" in capsys.readouterr().out


# -- Hydra's stage: one line, exit 2 -------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "message"), [
    ("adapter.rnak=4", "adapter.rnak: no such config key (did you mean adapter.rank?)"),
    ("trainer.lr=fast", "trainer.lr: Value 'fast' of type 'str' could not be converted to Float"),
    ("adapter=foo", "adapter=foo: no such option; choose one of hydralora, lora, malora, molora"),
    ("adapter.rank=[4", "cannot parse override 'adapter.rank=[4': "),
    ("adapter", "cannot parse override 'adapter': expected key=value or group=option"),
    ("adapter.rank=4,8", "adapter.rank=4,8: a comma-separated value is a sweep: add -m"),
    ("+foo=1", "foo: no such config key"),
    ("eval.scorer=foo", "eval.scorer='foo' is not one of label_logits, generate"),
    ("trainer.lr_scheduler=cosin",
     "trainer.lr_scheduler='cosin' is not supported; choose one of linear, cosine,"),
    ("+trainer.lr_scheduler_kwargs={cycles: 2}",
     "trainer.lr_scheduler=linear with trainer.lr_scheduler_kwargs="),
    ("data.sampling=random", "data.sampling='random' is not one of proportional, uniform, temperature"),
    ("logger.wandb.mode=loud", "logger.wandb.mode='loud' is not one of online, offline, disabled"),
    ("eval.export=gguf", "eval.export='gguf' is not one of merged"),
    ("trainer.gradient_checkpointing=some",
     "trainer.gradient_checkpointing='some' is not one of true, false, selective"),
    ("trainer.compile_adapters=fused",
     "trainer.compile_adapters='fused' is not one of auto, traced, kernels"),
    ("trainer.lr_scheduler=reduce_lr_on_plateau",
     "trainer.lr_scheduler='reduce_lr_on_plateau' is not supported (it"),
    ("trainer.lr_scheduler=cosine_with_min_lr",
     "trainer.lr_scheduler=cosine_with_min_lr with trainer.lr_scheduler_"),
    ("logger.trackers=[tensorbord]",
     "logger.trackers: 'tensorbord' is not an Accelerate tracker; choose from "),
    ("logger.wandb.mode=offline",
     "logger.wandb.mode=offline logs nothing unless logger.trackers names wandb"),
    ("data.prompt_template=chatml", "data.prompt_template='chatml' is not one of auto, alpaca, plain, chat"),
    ("eval.max_labels=0", "eval.max_labels=0 must be >= 1"),
    ("eval.max_examples=0", "eval.max_examples=0 must be >= 1"),
    ("eval.number_tolerance=-1", "eval.number_tolerance=-1.0 must be >= 0"),
])
def test_bad_overrides_are_one_line_before_anything_is_written(monkeypatch, capsys, tmp_path, override,
                                                               message):
    run_dir = tmp_path / "run"
    assert run_program(monkeypatch, "malora-train", [*TINY, override, f"hydra.run.dir={run_dir}"]) == 2
    assert error_line(capsys).startswith(message)
    assert not run_dir.exists()  # not even Hydra's .hydra/ folder


def test_schedule_arguments_as_the_readme_gives_them_pass_the_checks():
    from malora_train.cli import compose
    from malora_train.train.preflight import check_config

    for argv in (["trainer.lr_scheduler=cosine_with_min_lr",
                  "+trainer.lr_scheduler_kwargs={min_lr_rate: 0.1}"],
                 ["trainer.lr_scheduler=cosine_with_restarts", "+trainer.lr_scheduler_kwargs.num_cycles=2"]):
        cfg = compose([*TINY, *argv])
        check_config(cfg)
        assert cfg.trainer.lr_scheduler_kwargs in ({"min_lr_rate": 0.1}, {"num_cycles": 2})


def test_task_weights_and_caps_take_new_task_names_as_the_readme_gives_them(repo_root):
    from malora_train.cli import compose

    readme = (repo_root / "README.md").read_text()
    assert "'data.task_weights={sentiment: 2.0}'" in readme and "`data.task_caps.case=500`" in readme
    for argv in (["data.task_weights={sentiment: 2.0}", "data.task_caps.case=500"],
                 ["+data.task_weights={sentiment: 2.0}", "+data.task_caps.case=500"]):
        cfg = compose([*TINY, *argv])
        assert cfg.data.task_weights == {"sentiment": 2.0} and cfg.data.task_caps == {"case": 500}
    cfg = compose([*TINY, "data=mixture_commonsense", "data.task_weights={boolq: 0.5}"])
    assert cfg.data.task_weights == {"boolq": 0.5}


def test_task_weights_stay_typed_and_other_keys_stay_closed(monkeypatch, capsys):
    from malora_train.cli import compose

    for argv, message in (
            (["data.task_weights={sentiment: abc}"], "data.task_weights.sentiment: Value 'abc'"),
            (["data.task_weights.sentiment=1", "data.nope=1"], "data.nope: no such config key")):
        with pytest.raises(SystemExit) as stop:
            compose([*TINY, *argv])
        assert stop.value.code == 2
        assert error_line(capsys).startswith(message)


def test_compose_based_commands_give_the_same_one_line_errors(monkeypatch, capsys):
    for program in ("malora-eval", "malora-inspect"):
        assert run_program(monkeypatch, program, ["adapter.rnak=4"]) == 2
        assert error_line(capsys, program) == "adapter.rnak: no such config key (did you mean adapter.rank?)"
        assert run_program(monkeypatch, program, ["--bogus"]) == 2
        assert error_line(capsys, program) == f"unknown option --bogus (see {program} --help)"


def test_a_read_only_output_folder_is_one_line_naming_it(monkeypatch, capsys, read_only_dir):
    run_dir = read_only_dir / "run"
    assert run_program(monkeypatch, "malora-train",
                       [*TINY, "trainer.max_steps=1", f"hydra.run.dir={run_dir}"]) == 2
    # EACCES, or EPERM for root
    assert error_line(capsys).startswith(f"{run_dir}: cannot create the folder (")
    assert not run_dir.exists()


def test_a_full_disk_is_one_line_naming_the_file_and_keeps_what_was_written(monkeypatch, capsys, tmp_path):
    run_dir = tmp_path / "run"
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up while summary.json is written
        if "/.summary.json." in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(rd.os, "fsync", fsync)
    assert run_program(monkeypatch, "malora-train", [*TINY, "trainer.max_steps=2", "trainer.save_every=2",
                                                 f"hydra.run.dir={run_dir}"]) == 2
    assert error_line(capsys, alone=False) == (f"{run_dir / 'summary.json'}: cannot write it "
                                               "(No space left on device)")
    assert not (run_dir / "summary.json").exists() and not list(run_dir.glob(".summary.json*"))
    assert [s for s, _ in complete_checkpoints(run_dir)] == [2]  # the steps are safe in the checkpoint


def test_a_missing_local_model_folder_says_so(monkeypatch, capsys, tmp_path):
    assert run_program(monkeypatch, "malora-train", [*TINY, "model.source=pretrained", "model.tokenizer=null",
                                                 "model.name_or_path=./no-such-model",
                                                 f"hydra.run.dir={tmp_path / 'run'}"]) == 2
    assert error_line(capsys) == "model.name_or_path=./no-such-model: no such folder"
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_a_run_that_fails_before_its_first_step_leaves_the_directory_reusable(monkeypatch, capsys, tmp_path):
    from malora_train.train.loop import Trainer

    run_dir = tmp_path / "run"
    argv = [*TINY, "trainer.max_steps=2", "trainer.eval_before=true", f"hydra.run.dir={run_dir}"]

    def failing_eval(self, record_routing=False):
        raise RuntimeError("the evaluation ran out of memory")

    monkeypatch.setattr(Trainer, "evaluate", failing_eval)
    # not a user error: its traceback, as Hydra gives it
    assert run_program(monkeypatch, "malora-train", argv) == 1
    assert "RuntimeError: the evaluation ran out of memory" in capsys.readouterr().err
    assert (run_dir / ".hydra").is_dir() and not (run_dir / "config.yaml").exists()
    monkeypatch.undo()
    capsys.readouterr()
    # no trainer.resume needed: nothing was started
    assert run_program(monkeypatch, "malora-train", argv) == 0
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


# -- a run directory's own config ----------------------------------------------------------------------------
def test_eval_on_a_run_directory_starts_from_its_config(monkeypatch, capsys, trained_run):
    from malora_train.cli import eval_main

    capsys.readouterr()
    report = eval_main([f"eval.run_dir={trained_run}", "data.eval_per_task=3"])
    assert set(report["accuracy"]) == {"sentiment", "case"}  # the run's tasks, not the default mixture
    assert {c["total"] for c in report["counts"].values()} == {3}  # the command line on top
    summary = json.loads((trained_run / "summary.json").read_text())
    again = eval_main([str(trained_run)])  # the run directory as a plain argument: the run's own figures
    assert again["accuracy"] == pytest.approx(summary["eval_after"])


def test_a_sweep_job_folder_is_pasted_as_it_is(monkeypatch, capsys, trained_run, tmp_path):
    from malora_train.cli import eval_main

    job = tmp_path / "multirun" / "2026-01-01" / "12-00-00_42" / "3_adapter=lora,adapter.rank=4,seed=0"
    shutil.copytree(trained_run, job)
    for argv in ([f"eval.run_dir={job}", "data.eval_per_task=2"], [str(job), "data.eval_per_task=2"]):
        report = eval_main(argv)
        assert report["adapter"] == str(job / "adapter") and set(report["accuracy"]) == {"sentiment", "case"}


def test_eval_of_a_run_still_training_is_refused_in_one_line(monkeypatch, capsys, trained_run) -> None:
    holder = hold_lock(trained_run, 60)
    try:
        before = snapshot(trained_run)
        assert run_program(monkeypatch, "malora-eval", [str(trained_run)]) == 2
        message = error_line(capsys, "malora-eval")
        assert message.startswith(f"eval.run_dir={trained_run} is in use by another run "
                                  f"(pid {holder.pid} on ")
        assert message.endswith("wait for it to end or choose another eval.run_dir")
        assert snapshot(trained_run) == before
    finally:
        holder.kill()
        holder.wait()
        (trained_run / rd.LOCK_FILE).unlink()  # the killed holder's: the fixture's run is shared


def test_eval_of_a_run_that_has_no_adapter_yet_names_the_running_run(monkeypatch, capsys, trained_run,
                                                                      tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("adapter", "summary.json"))
    holder = hold_lock(run, 60)  # the run, still training: no adapter/ yet
    try:
        assert run_program(monkeypatch, "malora-eval", [str(run)]) == 2
        message = error_line(capsys, "malora-eval")
        assert message.startswith(f"eval.run_dir={run} is in use by another run (pid {holder.pid} on ")
    finally:
        holder.kill()
        holder.wait()


def test_a_read_only_eval_output_dir_is_found_before_the_evaluation(monkeypatch, capsys, trained_run,
                                                                    read_only_dir):
    from malora_train.commands import evaluate

    out = read_only_dir / "eval"
    monkeypatch.setattr(evaluate, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("the model loaded"))
    assert run_program(monkeypatch, "malora-eval", [str(trained_run), f"eval.output_dir={out}"]) == 2
    # EACCES, or EPERM for root
    assert error_line(capsys, "malora-eval").startswith(f"eval.output_dir={out}: cannot write files there (")
    assert not (trained_run / rd.LOCK_FILE).exists()


def test_a_writable_eval_output_dir_check_leaves_nothing_behind(tmp_path):
    rd.check_writable(tmp_path / "a" / "b", "eval.output_dir=x")
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_cannot_enable_remote_code(monkeypatch, capsys, trained_run, tmp_path):
    """``trust_remote_code`` and the model folder's code come from the command line, never config.yaml."""
    from malora_train.cli import _command_config

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = _command_config("malora-eval", [str(run)], run_dir_argument=True)
    assert isinstance(cfg, Config) and cfg.model.trust_remote_code is False
    assert _command_config("malora-eval", [str(run), "model.trust_remote_code=true"],
                           run_dir_argument=True).model.trust_remote_code is True


def test_a_saved_config_is_plain_data(monkeypatch, trained_run, tmp_path):
    from malora_train.cli import _command_config

    monkeypatch.setenv("MALORA_TEST_SECRET", "hunter2")
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["logger"]["wandb"]["name"] = "${oc.env:MALORA_TEST_SECRET}"
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    cfg = _command_config("malora-eval", [str(run)], run_dir_argument=True)
    assert cfg.logger.wandb.name == "${oc.env:MALORA_TEST_SECRET}"


def test_a_completed_run_resumed_is_left_untouched(monkeypatch, capsys, trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    capsys.readouterr()
    assert run_program(monkeypatch, "malora-train", ["trainer.resume=auto", f"hydra.run.dir={run}"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{run} is complete (4 steps, eval average ")
    assert snapshot(run) == before and sorted(p.name for p in run.iterdir()) == sorted(
        p.name for p in trained_run.iterdir())

    # asking for more steps continues from the last checkpoint, with the run's own config
    assert run_program(monkeypatch, "malora-train", ["trainer.resume=auto", "trainer.max_steps=6",
                                                 f"hydra.run.dir={run}"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["adapter"] == "lora" and set(summary["eval_after"]) == {
        "sentiment", "case"}
    train_steps = [r["step"] for r in rd.read_jsonl(run / "metrics.jsonl") if "lm_loss" in r]
    assert train_steps == [1, 2, 3, 4, 5, 6]


def test_a_damaged_newest_checkpoint_is_skipped_by_auto_and_named_when_asked_for(monkeypatch, capsys,
                                                                                  trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    damaged = run / "checkpoints" / "step_4" / "optimizer.safetensors"
    size = damaged.stat().st_size
    damaged.write_bytes(damaged.read_bytes()[:200])
    capsys.readouterr()
    assert run_program(monkeypatch, "malora-train", [f"trainer.resume={damaged.parent}",
                                                     "trainer.max_steps=6", f"hydra.run.dir={run}"]) == 2
    assert error_line(capsys) == (f"trainer.resume={damaged.parent}: damaged checkpoint: {damaged}: "
                                  f"200 bytes, the manifest says {size} (truncated?)")
    assert run_program(monkeypatch, "malora-train", ["trainer.resume=auto", "trainer.max_steps=6",
                                                 f"hydra.run.dir={run}"]) == 0
    log = (run / "cli.log").read_text()
    assert f"skipping damaged checkpoint step_4 ({damaged}: 200 bytes" in log
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in log
    assert json.loads((run / "summary.json").read_text())["steps"] == 6


@pytest.mark.parametrize(("override", "key"), [("adapter.rank=8", "adapter.rank"),
                                               ("adapter=malora", "adapter.kind"),
                                               ("model=smollm2_135m", "model.name")])
def test_resuming_refuses_a_change_of_tensor_shapes(monkeypatch, capsys, trained_run, tmp_path, override,
                                                    key):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    before = snapshot(run)
    capsys.readouterr()
    assert run_program(monkeypatch, "malora-train", ["trainer.resume=auto", "trainer.max_steps=6", override,
                                                 f"hydra.run.dir={run}"]) == 2
    line = error_line(capsys)
    assert line.startswith(f"{key}=") and line.endswith(
        f"in {run / 'config.yaml'}: a run resumes with the model and adapter it was trained with "
        "(start a new run to change them)")
    assert snapshot(run) == before


# the adapter section of a LoRA r=4 run as versions with one flat adapter config (every kind's keys) saved it
FLAT_LORA = {"kind": "lora",
             "target_modules": ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], "rank": 4,
             "alpha": None, "dropout": 0.05, "use_rslora": False, "num_experts": 8, "lam": 0.5,
             "shared_rank": None, "expert_rank": None, "beta": 1.0, "freeze_shared": False,
             "freeze_coeff": False, "impl": "fast", "shared_input": True,
             "router": {"top_k": 2, "dense": False, "renormalize": True, "jitter_noise": 0.0,
                        "balance_coef": 0.01, "z_loss_coef": 0.0, "init_std": 0.02}}


def test_a_run_directory_of_the_flat_adapter_config_is_resumed_and_evaluated(monkeypatch, capsys, trained_run,
                                                                               tmp_path):
    """Its config.yaml and adapter files hold every kind's keys: those LoRA does not read, at their defaults,
    are dropped; one set to anything else is refused, naming it."""
    from malora_train.cli import eval_main

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "adapter": FLAT_LORA}, sort_keys=False))
    metadata_file = run / "adapter" / "malora_adapter.json"  # the checkpoints' are in manifests (and unread)
    metadata = json.loads(metadata_file.read_text())
    metadata["malora_train"]["adapter"] = FLAT_LORA
    metadata_file.write_text(json.dumps(metadata))
    (run / "adapter" / "manifest.json").unlink()  # the version of flat configs wrote no manifest there
    capsys.readouterr()
    assert run_program(monkeypatch, "malora-train", ["trainer.resume=auto", f"hydra.run.dir={run}"]) == 0
    assert capsys.readouterr().out.startswith(f"{run} is complete (4 steps, eval average ")
    summary = json.loads((run / "summary.json").read_text())
    assert eval_main([str(run)])["accuracy"] == pytest.approx(summary["eval_after"])
    assert run_program(monkeypatch, "malora-train", ["trainer.resume=auto", "trainer.max_steps=5",
                                                 f"hydra.run.dir={run}"]) == 0
    assert json.loads((run / "summary.json").read_text())["steps"] == 5

    (run / "config.yaml").write_text(yaml.safe_dump({**saved, "adapter": {**FLAT_LORA, "lam": 0.25}}))
    capsys.readouterr()
    assert run_program(monkeypatch, "malora-eval", [str(run)]) == 2
    assert error_line(capsys, "malora-eval") == (f"{run / 'config.yaml'}: adapter.lam=0.25 is set, but "
                                                 "adapter=lora does not read it (read by malora)")


def test_config_dir_adds_a_users_own_group_options(monkeypatch, capsys, tmp_path):
    """A user's data YAML from another folder, selected like a packaged option (nothing copied)."""
    from malora_train.cli import _command_config

    mine = tmp_path / "myconf" / "data"
    mine.mkdir(parents=True)
    (mine / "two_tasks.yaml").write_text("name: two_tasks\nsource: synthetic\ntasks: [sentiment, compare]\n"
                                         "eval_per_task: 6\n")
    cfg = _command_config("malora-inspect", ["--config-dir", str(tmp_path / "myconf"), "data=two_tasks"])
    assert cfg.data.tasks == ["sentiment", "compare"] and cfg.data.eval_per_task == 6
    # the schema's defaults: the file is typed and checked
    assert (cfg.data.prompt_template, cfg.data.prompt_template_fallback) == ("auto", "alpaca")
    (mine / "bad.yaml").write_text("tasks: [a]\nsampling_rate: 2\n")
    assert run_program(monkeypatch, "malora-inspect",
                       [f"--config-dir={tmp_path / 'myconf'}", "data=bad"]) == 2
    assert "sampling_rate" in error_line(capsys, "malora-inspect")


def test_a_users_adapter_yaml_starts_from_its_kind(monkeypatch, capsys, tmp_path):
    """An adapter YAML of one's own extends a packaged preset (its class and values); without it, a key only
    some kinds read is refused with a line that says how to start the file."""
    from malora_train.cli import _command_config

    mine = tmp_path / "myconf" / "adapter"
    mine.mkdir(parents=True)
    (mine / "small_molora.yaml").write_text("defaults:\n  - molora\n  - _self_\n\nrank: 4\nnum_experts: 4\n")
    config_dir = str(tmp_path / "myconf")
    cfg = _command_config("malora-inspect", ["--config-dir", config_dir, "adapter=small_molora"])
    assert (cfg.adapter.kind, cfg.adapter.rank, cfg.adapter.num_experts, cfg.adapter.router.top_k) == (
        "molora", 4, 4, 2)
    (mine / "plain.yaml").write_text("kind: molora\nnum_experts: 4\n")
    assert run_program(monkeypatch, "malora-inspect", [f"--config-dir={config_dir}", "adapter=plain"]) == 2
    assert error_line(capsys, "malora-inspect") == (
        "In 'adapter/plain': adapter.num_experts: no such config key in an adapter YAML that does not start "
        "from its kind (read by molora, malora, hydralora); begin the file with defaults: [molora, _self_]")


# -- runs side by side ---------------------------------------------------------------------------------------
def cli_process(cwd: Path, argv: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("MALORA_RUN_DIR", None)
    return subprocess.Popen([sys.executable, "-m", "malora_train.cli", *argv], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_in_a_running_directory_is_refused_and_changes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    # long enough to be still training when stopped (400 steps could end during the two refusals on a fast
    # machine: the stop then fell into the final evaluation, which signals end at once)
    first = cli_process(tmp_path, [*TINY, "trainer.max_steps=100000", f"hydra.run.dir={run_dir}"])
    deadline = time.monotonic() + 120
    while not ((run_dir / "metrics.jsonl").is_file() and (run_dir / "metrics.jsonl").read_text().count("\n")):
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.05)
    config = (run_dir / "config.yaml").read_bytes()
    hydra_files = {name: (run_dir / ".hydra" / name).read_bytes()
                   for name in ("config.yaml", "overrides.yaml")}
    for extra in (["trainer.resume=auto"], ["adapter=lora"]):  # resuming it, or a new run over it
        second = cli_process(tmp_path, [*TINY, "trainer.max_steps=400", *extra, f"hydra.run.dir={run_dir}"])
        out, err = second.communicate(timeout=120)
        assert second.returncode == 2, out + err
        assert err.strip().startswith(f"malora-train: error: hydra.run.dir={run_dir} is in use by another "
                                      f"run (pid {first.pid} on host ")
        assert "\n" not in err.strip()
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=120) == 0
    assert (run_dir / "config.yaml").read_bytes() == config
    assert {name: (run_dir / ".hydra" / name).read_bytes() for name in hydra_files} == hydra_files
    steps = [r["step"] for r in rd.read_jsonl(run_dir / "metrics.jsonl") if "lm_loss" in r]
    assert steps == list(range(1, len(steps) + 1))  # one run's steps, each once
    assert not (run_dir / rd.LOCK_FILE).exists()


def test_runs_started_together_without_a_run_directory_get_their_own(tmp_path):
    runs = [cli_process(tmp_path, [*TINY, "trainer.max_steps=1", "eval.routing=false"]) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
    folders = sorted((tmp_path / "outputs").glob("*/*"))
    assert sorted(f.name.rsplit("_", 1)[1] for f in folders) == sorted(str(run.pid) for run in runs)
    assert all((folder / "summary.json").is_file() for folder in folders)


def test_flags_are_accepted_anywhere_on_the_command_line(monkeypatch, capsys):
    from malora_train.cli import flags_first

    assert flags_first(["model=tiny", "--config-dir", "mine", "data=math3", "-m", "seed=1"]) == [
        "--config-dir", "mine", "-m", "model=tiny", "data=math3", "seed=1"]
    argv = ["model=tiny", "--cfg", "job", "data.train_per_task=8"]  # a flag and its value in the middle
    assert run_program(monkeypatch, "malora-train", argv) == 0
    assert "train_per_task: 8" in capsys.readouterr().out
