"""Speed settings of a model's forward pass: mixed precision (autocast) and torch.compile.

Training and inference read ``auto`` differently. Training takes bf16 wherever the hardware has
it (GPU, bf16-capable CPUs). Inference takes it on GPU only, so the pseudo labels of a CPU run
stay exact fp32 unless a config asks otherwise.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.errors import ConfigError

# what a run records: the precision its forward passes actually ran in
PRECISIONS = ("fp32", "bf16", "fp16")


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve(mode: str, device: torch.device, inference: bool = False) -> str:
    """A config's ``mixed_precision`` (auto, no, bf16, fp16) on ``device`` -> fp32, bf16 or fp16.

    fp16 is GPU only (elsewhere: fp32). A launcher's request was applied when the config was read
    (``config.launcher_precision``).
    """
    if mode == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if not inference and device.type == "cpu" and cpu_has_bf16() else "fp32"
    if mode == "no" or (mode == "fp16" and device.type != "cuda"):
        return "fp32"
    return mode


def autocast(precision: str, device: torch.device):
    """The autocast context for a resolved ``precision`` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def grad_scaler(precision: str):
    """fp16 training needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler("cuda") if precision == "fp16" else None


def compile_backend(value: bool | str) -> str | None:
    """A config's ``compile`` (false, true or a backend name) -> the torch.compile backend, or None."""
    if value is True:
        return "inductor"
    return value or None


def check_compile(value: bool | str, key: str) -> None:
    """Refuse an unknown backend name before any work starts (ConfigError naming ``key``)."""
    backend = compile_backend(value)
    if backend is None or backend == "inductor":
        return
    import torch._dynamo

    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ConfigError(f"{key}: unknown torch.compile backend {backend!r} (known: true, "
                          f"{', '.join(torch._dynamo.list_backends())}, eager, aot_eager)")


def compile_model(model: torch.nn.Module, value: bool | str) -> torch.nn.Module:
    """Compile ``model``'s forward in place when ``value`` asks for it; returns the model.

    ``Module.compile`` keeps the module itself (not an ``OptimizedModule`` wrapper), so state-dict
    keys, checkpoints, the EMA copy and ``load_state_dict`` are the same as without compiling.
    The first batches are slow while it compiles; later shapes (a short last batch) compile again.
    """
    backend = compile_backend(value)
    if backend is not None and getattr(model, "_compiled_call_impl", None) is None:  # once: no recompiles
        model.compile(backend=backend)
    return model
