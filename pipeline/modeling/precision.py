"""Speed settings of a model's forward pass: mixed precision (autocast) and torch.compile.

Training and inference read ``auto`` differently. Training takes bf16 where the hardware computes
it natively (GPU, x86 CPUs with avx512_bf16 or AMX); where a CPU only emulates bf16 it is slower
than fp32, so ``auto`` takes fp32 there. Inference takes bf16 on GPU only, so the pseudo labels of
a CPU run stay exact fp32 unless a config asks otherwise. A training phase that met a non-finite
step in bf16 records a fallback in the experiment directory (``FALLBACK``): later phases and
rounds of that experiment train in fp32.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from pipeline.artifacts import read_json, write_json_atomic
from pipeline.errors import ConfigError

# what a run records: the precision its forward passes actually ran in
PRECISIONS = ("fp32", "bf16", "fp16")
FALLBACK = "precision.json"  # in an experiment directory: bf16 went non-finite there, train in fp32
_NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16"}


@functools.cache
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bf16 in hardware (Linux x86 flags: avx512_bf16 or amx_bf16).

    oneDNN runs bf16 on any AVX-512 CPU, but without these instructions it converts in software
    and is slower than fp32 (bench/results/cifar10_recipes.json; native: precision_speed.json)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return bool(_NATIVE_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return False


def resolve(mode: str, device: torch.device, inference: bool = False) -> str:
    """A config's ``mixed_precision`` (auto, no, bf16, fp16) on ``device`` -> fp32, bf16 or fp16.

    fp16 is GPU only (elsewhere: fp32). A launcher's request was applied when the config was read
    (``config.launcher_precision``).
    """
    if mode == "auto":
        if device.type == "cuda":
            return "bf16"
        return "bf16" if not inference and device.type == "cpu" and cpu_has_native_bf16() else "fp32"
    if mode == "no" or (mode == "fp16" and device.type != "cuda"):
        return "fp32"
    return mode


def for_training(mode: str, device: torch.device, run_dir: Path | None) -> tuple[str, str | None]:
    """A training phase's precision and, when it is not what ``resolve`` gives, why: an experiment
    whose bf16 training went non-finite before trains in fp32."""
    dtype = resolve(mode, device)
    fallback = read_fallback(run_dir) if dtype == "bf16" and run_dir is not None else None
    if fallback is None:
        return dtype, None
    return "fp32", f"bf16 went non-finite earlier in this experiment ({fallback['where']}; {run_dir / FALLBACK})"


def record_fallback(run_dir: Path, where: str) -> None:
    """Note in ``run_dir`` that bf16 training went non-finite at ``where`` (the first time only)."""
    path = run_dir / FALLBACK
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"precision": "fp32", "where": where})


def read_fallback(run_dir: Path) -> dict | None:
    path = run_dir / FALLBACK
    return read_json(path) if path.is_file() else None


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
    if backend is not None and getattr(model, "compiled_by_noisy_student", None) is None:  # once: no recompiles
        check_compile(value, "compile")
        model.compile(backend=backend)
        model.compiled_by_noisy_student = backend
    return model
