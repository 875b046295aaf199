"""noisy-student: Noisy Student self-training and distillation on timm, webdataset and Accelerate."""

__version__ = "0.1.0"
