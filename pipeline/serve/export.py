"""ONNX export of a model directory, checked against PyTorch before it is kept.

``<out>/`` gets ``model.onnx`` (input ``input``: normalised float32 NCHW with a dynamic batch
axis; output ``logits``), copies of the model's ``config.json`` and ``card.json`` (preprocessing
and label names travel with the graph) and ``export.json``, written last: what was exported
(sha256 of the source files), how (exporter, opset, versions) and the check's max abs diff.

The check runs onnxruntime and PyTorch on seeded random images at batch sizes 1, 8 and 32 (the
batch axis is dynamic, so more than one size is tried) and refuses the export when any logit
differs by more than ``tolerance`` (default 1e-4). A rerun whose source and settings match the
existing export.json, and whose files still hash as recorded, does nothing.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from pipeline import failpoints
from pipeline.artifacts import (
    atomic_path,
    clean_tmp_of,
    files_match,
    read_json,
    sha256_file,
    write_json_atomic,
)
from pipeline.config import ConfigError
from pipeline.data.dataset import Preprocessing
from pipeline.data.transforms import normalize
from pipeline.modeling.models import CARD, TIMM_CONFIG, WEIGHTS, load_model_dir, preprocessing

ONNX_FILE = "model.onnx"
EXPORT_JSON = "export.json"
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
EXPORTERS = ("dynamo", "torchscript")
DEFAULT_TOLERANCE = 1e-4
CHECK_BATCHES = (1, 8, 32)
CHECK_SEED = 0
INSTALL_HINT = "pip install 'noisy-student[onnx]'"


def require_onnx(*modules: str) -> None:
    """Import the optional ONNX packages or stop with one line saying how to install them."""

    for name in modules or ("onnx", "onnxruntime"):
        try:
            importlib.import_module(name)
        except ImportError:
            raise ConfigError(f"ONNX support needs the '{name}' package: {INSTALL_HINT}") from None


def ort_session(path: str | Path):
    """A CPU onnxruntime session using as many threads as torch does (so OMP_NUM_THREADS applies)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    out = {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__}
    try:
        import onnxscript

        out["onnxscript"] = onnxscript.__version__
    except ImportError:
        pass
    return out


def _export(model: torch.nn.Module, example: torch.Tensor, path: Path, exporter: str, opset: int | None) -> None:
    """Write the graph to ``path``; the exporters' chatter is kept off the console."""

    kwargs: dict = {"input_names": [INPUT_NAME], "output_names": [OUTPUT_NAME], "opset_version": opset}
    if exporter == "dynamo":
        kwargs.update(dynamo=True, external_data=False, dynamic_shapes=({0: torch.export.Dim("batch")},))
    else:
        kwargs.update(dynamo=False, dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(path), **kwargs)
    except Exception as e:  # the exporters raise many types; the first line is what the user needs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        other = "torchscript" if exporter == "dynamo" else "dynamo"
        raise ConfigError(f"ONNX export ({exporter}) failed: {type(e).__name__}: {first} "
                          f"(try exporter={other})") from None


def _random_inputs(prep: Preprocessing, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Seeded random uint8 images, normalised like real inputs (so logits are in their usual range)."""

    c = prep.in_chans
    x = torch.randint(0, 256, (batch, c, prep.size, prep.size), generator=gen, dtype=torch.uint8)
    return normalize(x, torch.tensor(prep.mean), torch.tensor(prep.std))


def check_onnx(model: torch.nn.Module, onnx_path: Path, prep: Preprocessing,
               batches: tuple[int, ...] = CHECK_BATCHES, seed: int = CHECK_SEED) -> float:
    """Max abs difference of logits between onnxruntime and PyTorch over seeded batches."""
    sess = ort_session(onnx_path)
    gen = torch.Generator().manual_seed(seed)
    worst = 0.0
    with torch.inference_mode():
        for b in batches:
            x = _random_inputs(prep, b, gen)
            ref = model(x).float().numpy()
            got = sess.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0]
            if got.shape != ref.shape:
                raise ConfigError(f"ONNX check: batch {b} gave shape {got.shape}, PyTorch {ref.shape}")
            worst = max(worst, float(np.abs(got.astype(np.float64) - ref).max()))
    return worst


def _source_hashes(model_dir: Path) -> dict[str, str | None]:
    card = model_dir / CARD
    return {WEIGHTS: sha256_file(model_dir / WEIGHTS), TIMM_CONFIG: sha256_file(model_dir / TIMM_CONFIG),
            CARD: sha256_file(card) if card.is_file() else None}


def _up_to_date(out_dir: Path, source: dict, settings: dict) -> dict | None:
    """The existing export.json when it was made from this source with these settings and is intact."""
    path = out_dir / EXPORT_JSON
    if not path.is_file():
        return None
    try:
        prev = read_json(path)
    except ValueError:
        return None
    if prev.get("source", {}).get("sha256") != source or prev.get("settings") != settings:
        return None
    return prev if files_match(out_dir, prev.get("files", {})) else None


def _copy_beside(model_dir: Path, out: Path, source: dict) -> dict[str, str]:
    """Copy the model's config and card beside the graph; their sha256 by name."""
    files = {}
    for name in (TIMM_CONFIG, CARD):
        if source[name] is not None:
            with atomic_path(out / name) as tmp:
                shutil.copyfile(model_dir / name, tmp)
            files[name] = sha256_file(out / name)
        else:
            (out / name).unlink(missing_ok=True)  # never leave a card that belongs to another model
    return files


def export_model_dir(model_dir: str | Path, out_dir: str | Path | None = None, *, opset: int | None = None,
                     tolerance: float = DEFAULT_TOLERANCE, exporter: str = "dynamo") -> tuple[dict, bool]:
    """Export ``model_dir`` to ONNX in ``out_dir`` (default ``<model_dir>/onnx``), check it, and
    return (export.json's content, whether work was done)."""
    if exporter not in EXPORTERS:
        raise ConfigError(f"exporter: expected one of {', '.join(EXPORTERS)}, got {exporter!r}")
    if tolerance <= 0:
        raise ConfigError(f"tolerance: must be > 0, got {tolerance}")
    model_dir = Path(model_dir)
    out = Path(out_dir) if out_dir is not None else model_dir / "onnx"
    require_onnx("onnx", "onnxruntime", *(("onnxscript",) if exporter == "dynamo" else ()))
    model, config = load_model_dir(model_dir)  # ConfigError when it is not a model directory
    if out.resolve() == model_dir.resolve():
        raise ConfigError(f"out: must differ from the model directory ({model_dir}); its config and card "
                          "are copied there")
    source = _source_hashes(model_dir)
    settings = {"exporter": exporter, "opset": opset, "tolerance": tolerance,
                "check_batches": list(CHECK_BATCHES), "check_seed": CHECK_SEED}
    for name in (ONNX_FILE, TIMM_CONFIG, CARD, EXPORT_JSON):  # what a killed export left (out= may be any folder)
        clean_tmp_of(out / name)
    prev = _up_to_date(out, source, settings)
    if prev is not None:
        return prev, False

    import onnx

    prep = preprocessing(config)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    example = _random_inputs(prep, 2, torch.Generator().manual_seed(CHECK_SEED))
    with atomic_path(out / ONNX_FILE) as tmp:
        _export(model, example, tmp, exporter, opset)
        failpoints.hit("onnx_write", tmp)
        diff = check_onnx(model, tmp, prep)
        if not diff <= tolerance:
            raise ConfigError(f"ONNX check failed: max abs logit difference {diff:.3g} exceeds tolerance "
                              f"{tolerance:g} (nothing written; tolerance=... to accept)")
        graph = onnx.load(str(tmp), load_external_data=False)
    files = {ONNX_FILE: sha256_file(out / ONNX_FILE), **_copy_beside(model_dir, out, source)}
    record = {
        "source": {"dir": str(model_dir.resolve()), "sha256": source},
        "settings": settings,
        "exporter": exporter,
        "opset": next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), None),
        "versions": _versions(),
        "input": {"name": INPUT_NAME, "shape": ["batch", *config["pretrained_cfg"]["input_size"]],
                  "dtype": "float32", "preprocessing": prep.as_dict()},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", int(config["num_classes"])]},
        "check": {"max_abs_diff": diff, "tolerance": tolerance, "batch_sizes": list(CHECK_BATCHES),
                  "seed": CHECK_SEED},
        "files": files,
        "seconds": round(time.time() - t0, 2),
    }
    write_json_atomic(out / EXPORT_JSON, record)
    return record, True
