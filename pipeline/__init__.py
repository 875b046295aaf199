"""noisy-student: Noisy Student self-training and distillation on timm, webdataset and Accelerate.

Importing the package imports nothing heavy (the command line answers --help without torch);
``pipeline.modeling`` registers our own architectures with timm.
"""

__version__ = "0.1.0"
