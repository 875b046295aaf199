"""noisy-student: Noisy Student self-training and distillation on timm, webdataset and Accelerate."""

from pipeline.modeling import archs  # noqa: F401  (registers our architectures with timm)

__version__ = "0.1.0"
