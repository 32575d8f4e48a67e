"""malora-train: multi-task fine-tuning with LoRA, MoLoRA, MALoRA and HydraLoRA adapters."""

__version__ = "0.1.0"
