"""scripts/study.py: every preset composes with every method it sweeps; a part runs on the tiny model
(2 methods x 2 seeds), is reported with its paired comparison, routing and plot, and a rerun trains nothing;
the BIG-bench probe's selection by measured gain; the run folders' names; a part packed for a repository
(its raw files archived, checked against their manifest) reports the same from what a clone holds."""

from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
import tarfile
from pathlib import Path

import pytest
import yaml
from script_modules import script_fixture

from malora_train.cli import compose
from malora_train.commands.report import ROUTING_DIGITS, rounded
from malora_train.commands.study_raw_files import ARCHIVE_FILE, MANIFEST_FILE
from malora_train.sweep.run_names import MAX_NAME, run_folder_name

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "conf" / "experiment"
TINY = ["model=tiny", "trainer.cuda_graphs=false", "trainer.progress=false", "data.train_per_task=32",
        "data.eval_per_task=4", "trainer.micro_batch_size=4", "trainer.max_steps=2"]


study = script_fixture("study")


def swept_variants(preset: str) -> list[str]:
    """The +variant values of a preset's sweep (following its defaults to the preset that sets them)."""
    content = yaml.safe_load((EXPERIMENTS / f"{preset}.yaml").read_text())
    params = (content.get("hydra") or {}).get("sweeper", {}).get("params", {})
    if "+variant" in params:
        return str(params["+variant"]).split(",")
    parent = next(d for d in content["defaults"] if isinstance(d, str))
    return swept_variants(parent)


@pytest.mark.parametrize("part", ["commonsense", "ablations", "synthetic", "bigbench_probe", "bigbench"])
def test_every_preset_composes_with_every_method_it_sweeps(study, part: str) -> None:
    preset = study.PRESETS[part]
    variants = swept_variants(preset)
    assert variants
    for variant in variants:
        cfg = compose([f"+experiment={preset}", f"+variant={variant}"])
        assert cfg.model.name == "smollm2_135m" and cfg.trainer.lr == 4e-4 and cfg.trainer.warmup_ratio == 0.1
    expected = {"malora_intra": ("malora", 1.25, False), "malora_fixed_shared": ("malora", 1.25, True),
                "malora": ("malora", 1.0, False), "malora_small": ("malora", 1.0, False)}
    for variant, (kind, beta, frozen) in expected.items():
        adapter = compose([f"+experiment={preset}", f"+variant={variant}"]).adapter
        assert (adapter.kind, adapter.beta, adapter.freeze_shared) == (kind, beta, frozen)


def test_a_part_runs_reports_and_a_rerun_skips_finished_runs(study, tmp_path: Path, capsys) -> None:
    argv = ["synthetic", "--out", str(tmp_path), *TINY, "+variant=lora,molora", "seed=0,1",
            f"data.cache_dir={tmp_path / 'tokenized'}"]
    assert study.main(argv) == 0
    part = tmp_path / "synthetic"
    summaries = sorted(part.glob("*/summary.json"))
    assert len(summaries) == 4  # one folder a run, named without the path (a path would nest folders)
    assert not any("cache_dir" in s.parent.name for s in summaries)
    names = sorted(s.parent.name for s in summaries)  # the rule of malora_train/sweep/run_names.py
    assert not set("+=,") & set("".join(names))
    named = r"experiment-paper_synthetic__variant-([a-z]+)__data.eval_per_task-4__.*__seed-(\d)__"
    expected = [("lora", "0"), ("lora", "1"), ("molora", "0"), ("molora", "1")]
    assert [re.match(named, name).groups() for name in names] == expected
    assert all(json.loads(s.read_text())["status"] == "completed" for s in summaries)
    out = capsys.readouterr().out
    assert ("| `+variant=lora` | `+variant=molora` | 2 |" in out
            or "| `+variant=molora` | `+variant=lora` | 2 |" in out)
    assert "#### `+variant=molora` (2 seed(s), top-2 of 8)" in out
    assert f"wrote {part / 'report.md'}" in out
    assert (part / "accuracy_vs_params.png").read_bytes()[:4] == b"\x89PNG"
    stamps = {s: s.stat().st_mtime_ns for s in summaries}
    assert study.main(argv) == 0
    assert out.count("is complete") == 0 and capsys.readouterr().out.count("is complete") == 4
    assert {s: s.stat().st_mtime_ns for s in summaries} == stamps  # nothing trained again
    priors = (part / study.PRIORS_FILE).read_text().splitlines()
    assert priors[0].startswith("Answering from the prior alone") and len(priors) == 2 + 2 + 5
    assert all(re.match(r"\| \w+ \| 4 \| \w+ \| \d+\.\d\d \| \w+ \| \d+\.\d\d \|$", row)
               for row in priors[4:])
    (part / "report.md").unlink()
    assert study.main(["synthetic", "--report-only", "--out", str(tmp_path), *TINY]) == 0
    assert "is complete" not in capsys.readouterr().out and (part / "report.md").is_file()
    assert {s: s.stat().st_mtime_ns for s in summaries} == stamps
    assert study.main(["ablations", "--report-only", "--out", str(tmp_path)]) == 2
    assert "nothing to report" in capsys.readouterr().err
    assert study.main(["bigbench", "--report-only", "--out", str(tmp_path), "data.tasks=[a,b,c,d,e]"]) == 2
    assert "nothing to report" in capsys.readouterr().err and not (tmp_path / "bigbench").exists()


def test_jobs_split_the_seeds_of_the_preset_or_of_the_command_line(study) -> None:
    assert study.sweep_seeds("commonsense", []) == ["0", "1", "2"]
    assert study.sweep_seeds("synthetic", []) == ["0", "1", "2"]  # inherited from paper_commonsense
    assert study.sweep_seeds("bigbench_probe", []) == ["0"]
    assert study.sweep_seeds("ablations", ["x=1", "seed=4,5"]) == ["4", "5"]
    assert study.job_overrides(["0", "1", "2"], 2, ["a=1", "seed=0,1,2"]) == [["a=1", "seed=0,2"],
                                                                              ["a=1", "seed=1"]]
    assert study.job_overrides(["0"], 3, []) == [["seed=0"]]  # never more jobs than seeds


def test_parallel_jobs_run_every_seed_once_and_report_once(study, tmp_path: Path, capsys) -> None:
    argv = ["synthetic", "--out", str(tmp_path), "--jobs", "2", *TINY, "+variant=lora", "seed=0,1",
            f"data.cache_dir={tmp_path / 'tokenized'}"]
    assert study.main(argv) == 0
    part = tmp_path / "synthetic"
    summaries = sorted(part.glob("*/summary.json"))
    assert len(summaries) == 2
    assert [re.search(r"seed-(\d)", s.parent.name).group(1) for s in summaries] == ["0", "1"]
    logs = sorted((part / "jobs").glob("*.log"))
    assert [log.name for log in logs] == ["0.log", "1.log"]
    assert all("reported" not in log.read_text() for log in logs)  # the jobs train, the parent reports
    out = capsys.readouterr().out
    assert out.count(f"wrote {part / 'report.md'}") == 1
    assert re.search(r"\| lora \| [\d,]+ \([\d.]+%\) \| 2 \|", out)  # one row, both seeds
    with pytest.raises(SystemExit):
        study.parse_args(["synthetic", "--jobs", "0"])


def write_probe(probe_dir: Path, before: dict[str, float], after: dict[str, float]) -> None:
    run = probe_dir / "+variant=lora,seed=0"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"status": "completed", "eval_before": before,
                                                  "eval_after": after}))


def test_probe_selects_tasks_by_measured_gain_and_bigbench_needs_five(study, tmp_path: Path, capsys) -> None:
    before = {f"t{i}": 50.0 for i in range(7)}
    after = {"t0": 75.0, "t1": 60.0, "t2": 59.9, "t3": 52.0, "t4": 70.0, "t5": 45.0, "t6": 61.0}
    write_probe(tmp_path / "bigbench_probe", before, after)
    assert study.select_tasks(tmp_path / "bigbench_probe", 10.0) == ["t0", "t4", "t6", "t1"]
    assert "data.tasks=[t0,t4,t6,t1]" in capsys.readouterr().out
    with pytest.raises(study.StudyError, match="selected 4 task.*fewer than 5.*lower --min-gain"):
        study.selected_tasks(tmp_path)
    assert study.select_tasks(tmp_path / "bigbench_probe", 5.0) == ["t0", "t4", "t6", "t1", "t2"]
    assert study.selected_tasks(tmp_path) == ["t0", "t4", "t6", "t1", "t2"]
    assert study.main(["bigbench", "--out", str(tmp_path / "none")]) == 2
    assert "run the probe first" in capsys.readouterr().err


def test_probe_over_prior_counts_the_gain_from_the_answer_prior_too(study, tmp_path: Path, capsys) -> None:
    before = {"learned": 20.0, "prior_only": 40.0, "prior_below": 30.0, "no_prior": 50.0}
    after = {"learned": 60.0, "prior_only": 62.0, "prior_below": 41.0, "no_prior": 61.0}
    priors = {"learned": 25.0, "prior_only": 62.0, "prior_below": 20.0}  # no_prior: its data gave none
    write_probe(tmp_path / "bigbench_probe", before, after)
    assert study.select_tasks(tmp_path / "bigbench_probe", 10.0, priors) == ["learned", "prior_only",
                                                                          "prior_below", "no_prior"]
    out = capsys.readouterr().out
    assert "| prior_only | 40.0 | 62.0 | 62.0 | +22.0 | +0.0 | yes |" in out
    assert "| no_prior | 50.0 | – | 61.0 | +11.0 | – | yes |" in out
    # the gain counts from the larger of zero-shot and prior: 60 - 25, 62 - 62, 41 - 30, 61 - 50
    assert study.select_tasks(tmp_path / "bigbench_probe", 10.0, priors, over_prior=True) == [
        "learned", "prior_below", "no_prior"]
    saved = json.loads((tmp_path / "bigbench_probe" / study.SELECTION_FILE).read_text())
    assert saved["over_prior"] is True and saved["answer_priors"] == priors
    assert "over both their zero-shot accuracy and their answer prior" in capsys.readouterr().out
    # selected again where the data is not (a report rebuilt from a clone): the recorded priors are kept
    assert study.select_tasks(tmp_path / "bigbench_probe", 10.0, {}, over_prior=True) == [
        "learned", "prior_below", "no_prior"]
    saved = json.loads((tmp_path / "bigbench_probe" / study.SELECTION_FILE).read_text())
    assert saved["answer_priors"] == priors
    write_probe(tmp_path / "fresh" / "bigbench_probe", before, after)  # no selection recorded, no data
    with pytest.raises(study.StudyError, match="--over-prior needs the tasks' answer priors"):
        study.select_tasks(tmp_path / "fresh" / "bigbench_probe", 10.0, {}, over_prior=True)


def test_bigbench_runs_are_named_without_their_task_list_and_keep_one_list_a_folder(study, tmp_path: Path,
                                                                                      capsys) -> None:
    """Five long task names would make a folder name past the file system's 255 bytes (as eleven real
    BIG-bench task names do): the runs are named by method and seed, and the folder remembers its task
    list."""
    tasks = [f"a_multiple_choice_task_with_a_rather_long_name_number_{i}" for i in range(5)]
    for i, task in enumerate(tasks):
        examples = [{"input": f"Task {i}, question {j}?", "target_scores": {f"yes {j}": 1, f"no {j}": 0}}
                    for j in range(24)]
        (tmp_path / "bb" / task).mkdir(parents=True)
        (tmp_path / "bb" / task / "task.json").write_text(json.dumps({"name": task, "examples": examples}))
    (tmp_path / "out" / "bigbench_probe").mkdir(parents=True)
    (tmp_path / "out" / "bigbench_probe" / study.SELECTION_FILE).write_text(json.dumps({"tasks": tasks}))
    argv = ["bigbench", "--out", str(tmp_path / "out"), *TINY, "+variant=lora", "seed=0",
            f"data.root={tmp_path / 'bb'}", f"data.cache_dir={tmp_path / 'tokenized'}", "--no-report"]
    assert study.main(argv) == 0
    runs = [s.parent.name for s in (tmp_path / "out" / "bigbench").glob("*/summary.json")]
    assert len(runs) == 1 and "variant-lora" in runs[0] and "data.tasks" not in runs[0]
    assert json.loads((tmp_path / "out" / "bigbench" / study.TASKS_FILE).read_text())["tasks"] == tasks
    capsys.readouterr()
    assert study.main([*argv, f"data.tasks=[{','.join(tasks[:4])}]"]) == 2
    assert "trained on data.tasks=[" in capsys.readouterr().err
    assert "data.tasks" not in " ".join(study.sweep_command("commonsense", tmp_path, [])[3:5])


# -- run folder names ------------------------------------------------------------------------------------

def test_run_folder_names_are_readable_deterministic_and_without_plus_equals_or_commas() -> None:
    overrides = ["seed=0", "+variant=malora_intra", "+experiment=paper_bigbench", "trainer.lr=1e-3",
                 "data.root=/x"]
    name = run_folder_name(overrides, ["data.root"])
    assert name == "experiment-paper_bigbench__variant-malora_intra__seed-0__trainer.lr-1e-3"
    assert run_folder_name(list(reversed(overrides)), ["data.root"]) == name  # the order given does not count
    assert run_folder_name(["model.target_modules=[q_proj,v_proj]", "~trainer.x", "a.b='x=y'"]) == (
        "a.b-x_y__model.target_modules-q_proj_v_proj__trainer.x")
    assert run_folder_name([]) == "default"
    many = [f"key{i}={'v' * 30}" for i in range(10)]
    long_name = run_folder_name(many)
    assert len(long_name) == MAX_NAME and re.search(r"-[0-9a-f]{12}$", long_name)
    assert run_folder_name([*many[:-1], f"key9={'w' * 30}"]) != long_name  # the hash tells them apart
    for found in (name, long_name):
        assert not set("+=,") & set(found)


def test_study_jobs_are_named_by_the_rule_through_the_resolver(study, tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    settings = study.sweep_command("bigbench", tmp_path, [])[3:5]
    subdir = settings[0].split("=", 1)[1].strip("'")
    excluded = settings[1].split("=", 1)[1].strip("[]").split(",")
    task = ["+variant=lora", "seed=1", "data.tasks=[a,b]", "data.root=/data", "+experiment=paper_bigbench"]
    cfg = OmegaConf.create({"hydra": {"sweep": {"subdir": subdir}, "overrides": {"task": task},
                                      "job": {"config": {"override_dirname": {"exclude_keys": excluded}}}}})
    assert cfg.hydra.sweep.subdir == "experiment-paper_bigbench__variant-lora__seed-1"


# -- a part packed for a repository ----------------------------------------------------------------------

REPORT_FILES = ("report.md", "report.csv", "accuracy_vs_params.png", "answer_priors.md")
RAW_FILES = ("metrics.jsonl", "routing.json")
PACK_AND_VERIFY = ("--pack", "--verify-raw")
PRIOR_DATA = ["data.train_per_task=32", "data.eval_per_task=4"]  # a small answer-prior computation


def shares(rng: random.Random, tasks: int, experts: int) -> list[list[float]]:
    rows = [[rng.random() for _ in range(experts)] for _ in range(tasks)]
    return [[value / sum(row) for value in row] for row in rows]


def write_fixture_run(part: Path, variant: str, seed: int) -> None:
    """A finished run as a study leaves it: overrides, summary, per-step metrics and (a mixture) routing, with
    numbers that do not round evenly."""
    rng = random.Random(f"{variant}-{seed}")
    overrides = [f"+variant={variant}", f"seed={seed}", "+experiment=paper_synthetic", "trainer.resume=auto"]
    run = part / run_folder_name(overrides, ["trainer.resume"])
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    lines = [{"step": step, "lm_loss": 2 / step + rng.random() / 100} for step in range(10, 110, 10)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines)
                                       + json.dumps({"step": 100, "eval/average": 50.0}) + "\n")
    accuracy = {"t0": 40 + 20 * rng.random(), "t1": 40 + 20 * rng.random()}
    (run / "summary.json").write_text(json.dumps({
        "status": "completed", "adapter": variant, "steps": 100, "train_time_s": 10 * rng.random(),
        "tokens_per_s": 1000 * rng.random(), "trainable_params": 5000 if variant == "lora" else 6000,
        "eval_after": accuracy, "eval_after_average": sum(accuracy.values()) / 2}))
    if variant != "lora":
        layers = {f"model.layers.{layer}.{module}": shares(rng, 2, 4) for layer in range(3)
                  for module in ("self_attn.q_proj", "mlp.up_proj")}
        average = [[sum(m[t][e] for m in layers.values()) / len(layers) for e in range(4)] for t in range(2)]
        (run / "routing.json").write_text(json.dumps({"tasks": ["t0", "t1"], "num_experts": 4, "top_k": 2,
                                                      "tokens": {"t0": 300, "t1": 100}, "layers": layers,
                                                      "average": average}))


def fixture_study(out: Path) -> Path:
    """A small study's part, ``<out>/synthetic``: LoRA and MoLoRA, three seeds each."""
    for variant in ("lora", "molora"):
        for seed in range(3):
            write_fixture_run(out / "synthetic", variant, seed)
    return out / "synthetic"


def test_rounded_keeps_the_given_significant_digits_of_every_nested_float() -> None:
    value = {"a": [0.123456789012345, 12345.6789012345, 3], "b": {"c": 1e-12 / 3}, "d": None, "e": "x"}
    assert rounded(value, 4) == {"a": [0.1235, 12350.0, 3], "b": {"c": 3.333e-13}, "d": None, "e": "x"}
    assert rounded(value)["a"][0] == 0.123456789


def sha256_hex(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_packed_part_reports_the_same_from_what_a_clone_holds(study, tmp_path: Path, capsys) -> None:
    part = fixture_study(tmp_path / "out")
    assert study.main(["synthetic", "--report-only", "--out", str(tmp_path / "out"), *PRIOR_DATA]) == 0
    assert "#### `+variant=molora` (3 seed(s), top-2 of 4)" in capsys.readouterr().out
    reports = {name: (part / name).read_bytes() for name in REPORT_FILES}
    raw = sorted(p.relative_to(part).as_posix() for p in part.rglob("*") if p.name in RAW_FILES)
    assert len(raw) == 9
    digests = {name: sha256_hex(part / name) for name in raw}

    assert study.main(["synthetic", "--pack", "--out", str(tmp_path / "out")]) == 0
    assert f"packed 9 raw files into {part / ARCHIVE_FILE}" in capsys.readouterr().out
    assert not [p for p in part.rglob("*") if p.name in RAW_FILES]
    assert len(list(part.glob("*/report_inputs.json"))) == 6
    for inputs in part.glob("*variant-molora*/report_inputs.json"):  # the routing means kept rounded
        routing = json.loads(inputs.read_text())["routing"]
        floats = [v for layer in routing["decoder_layers"] for row in layer["share"] for v in row]
        assert floats and all(v == float(f"{v:.{ROUTING_DIGITS}g}") for v in floats)
    assert (part / MANIFEST_FILE).read_text().splitlines() == [f"{digests[name]}  {name}" for name in raw]
    with tarfile.open(part / ARCHIVE_FILE) as archive:
        assert archive.getnames() == raw

    # a clone holds what git tracks: not the archive (.gitignore), and here not the reports either
    clone = tmp_path / "clone"
    shutil.copytree(tmp_path / "out", clone, ignore=shutil.ignore_patterns(ARCHIVE_FILE, *REPORT_FILES))
    assert study.main(["synthetic", "--report-only", "--out", str(clone), *PRIOR_DATA]) == 0
    assert {name: (clone / "synthetic" / name).read_bytes() for name in REPORT_FILES} == reports


def test_the_manifest_check_names_raw_files_that_differ_or_are_missing(study, tmp_path: Path,
                                                                       capsys) -> None:
    part = fixture_study(tmp_path / "out")
    pack, verify = (["synthetic", flag, "--out", str(tmp_path / "out")] for flag in PACK_AND_VERIFY)
    assert study.main(pack) == 0
    assert study.main(verify) == 0  # from the archive
    assert "every raw file matches" in capsys.readouterr().out
    with tarfile.open(part / ARCHIVE_FILE) as archive:
        archive.extractall(part, filter="data")  # the raw files put back
    assert study.main(verify) == 0
    metrics, routing = (next(part.glob(f"experiment-paper_synthetic__variant-molora__seed-0/{name}"))
                        for name in ("metrics.jsonl", "routing.json"))
    metrics.write_text(metrics.read_text() + json.dumps({"step": 110, "lm_loss": 0.1}) + "\n")
    routing.unlink()
    (part / ARCHIVE_FILE).unlink()
    capsys.readouterr()
    assert study.main(verify) == 1
    err = capsys.readouterr().err.splitlines()
    name = metrics.parent.name
    assert any(line.startswith(f"study.py: {name}/metrics.jsonl: {metrics} has sha256 ") for line in err)
    assert f"study.py: {name}/routing.json: missing (neither in {part} nor in {ARCHIVE_FILE})" in err
    assert study.main(pack) == 2  # packed already: refused, nothing overwritten
    assert "the part is packed already" in capsys.readouterr().err
    assert study.main(["bigbench", "--verify-raw", "--out", str(tmp_path / "out")]) == 2
    assert "nothing to verify" in capsys.readouterr().err
