"""zeroship launcher: recipe → Ray Train + DeepSpeed fine-tuning run → winning checkpoint."""

__version__ = "0.1.0"
