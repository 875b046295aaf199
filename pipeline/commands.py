"""The stages as commands: ``noisy-student <command> [--config FILE] [key=value | --key value ...]``.

One table (``COMMANDS``) says, per stage, its script in ``stages/``, its own options (``round=``,
``model=``, ...), the config sections it reads (what ``--help`` lists) and the library call it makes.
``stages/X.py`` and the installed ``noisy-student`` command both go through it, so they parse,
help and fail alike.

The bodies import the library inside the function: ``--help`` and a bad option must answer in a
fraction of a second, before torch and timm are imported (several seconds).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.cli import choice, config_help, int_at_least, parse_args, run
from pipeline.config import Config
from pipeline.errors import ConfigError
from pipeline.tracking import setup_logging


@dataclass(frozen=True)
class Option:
    """A stage's own key (not part of the experiment's config)."""

    parse: Callable[[str], object]
    help: str


@dataclass(frozen=True)
class Command:
    name: str  # the subcommand: noisy-student <name>
    script: str  # stages/<script>
    summary: str
    body: Callable[[Config, dict], int | None]
    sections: tuple[str, ...] = ()  # config sections --help lists ("" = the top-level keys)
    options: dict[str, Option] = field(default_factory=dict)
    uses_config: bool = True


def _prepare(cfg: Config, _: dict) -> None:
    from pipeline.data.prepare import load_manifest, prepare

    out = prepare(cfg)
    counts = ", ".join(f"{k} {v['count']}" for k, v in load_manifest(out)["splits"].items())
    print(f"data ready in {out}: {counts}")


def _train(cfg: Config, opts: dict) -> None:
    from pipeline.rounds import train_round

    role = opts.get("role", "teacher")
    k = opts.get("round", 0 if role == "teacher" else 1)
    if (role == "teacher") != (k == 0):
        raise ConfigError(f"role={role} does not go with round={k} (the teacher is round 0, students are 1, 2, ...)")
    train_round(cfg, int(k))


def _pseudo_label(cfg: Config, opts: dict) -> None:
    from pipeline.rounds import pseudo_label
    from pipeline.training.experiment import pseudo_label_dir

    k = int(opts.get("round", 1))
    pseudo_label(cfg, k)
    print(f"pseudo labels in {pseudo_label_dir(cfg, k)}")


def _iterate(cfg: Config, opts: dict) -> None:
    from pipeline.rounds import iterate, table
    from pipeline.runtime import make_accelerator

    rows = iterate(cfg, int(opts.get("round", 2)))
    if make_accelerator().is_main_process:
        print(f"\nexperiment {cfg.name} ({cfg.run_dir})\n" + table(rows))


def _distill(cfg: Config, _: dict) -> None:
    from pipeline.compress.compression import compression_report
    from pipeline.compress.distill import distill
    from pipeline.runtime import make_accelerator

    report = compression_report(cfg, distill(cfg))
    if make_accelerator().is_main_process and report:
        t, s = report["teacher"], report["student"]
        print(f"teacher {t['model']}: {t['params']} params, top-1 {t['test_top1']:.2f}%, {t['latency_ms_b1']:.2f} ms "
              f"(b1), {t['img_s_b64']:.0f} img/s (b64)")
        print(f"student {s['model']}: {s['params']} params, top-1 {s['test_top1']:.2f}%, {s['latency_ms_b1']:.2f} ms "
              f"(b1), {s['img_s_b64']:.0f} img/s (b64); retained {report['retained']:.2f}%"
              + (f"; labels only {report['labels_only_top1']:.2f}%" if report.get("labels_only_top1") else ""))
        print(f"compression report: {report['path']}")


def _evaluate(cfg: Config, opts: dict) -> None:
    from pipeline.evaluate.report import evaluate
    from pipeline.runtime import make_accelerator

    dirs = [d for d in str(opts["models"]).split(",") if d] if "models" in opts else None
    rows, path = evaluate(cfg, dirs, opts.get("test"), opts.get("out"))
    if make_accelerator().is_main_process:
        for r in rows:
            extra = "".join(f"  {k} {r[k.lower()]:6.2f}%" for k in ("mCE", "mFR") if r[k.lower()] is not None)
            print(f"{r['label']:<16} top-1 {r['test_top1']:6.2f}%  ECE {r['ece']:.4f}{extra}")
        if path is not None:
            print(f"report: {path} (and report.html beside it)")


def _export(_: Config, opts: dict) -> None:
    from pipeline.serve.export import DEFAULT_TOLERANCE, export_model_dir

    if "model" not in opts:
        raise ConfigError("model=<model directory> is required")
    record, worked = export_model_dir(opts["model"], opts.get("out"), opset=opts.get("opset"),
                                      tolerance=float(opts.get("tolerance", DEFAULT_TOLERANCE)),
                                      exporter=str(opts.get("exporter", "dynamo")))
    out = Path(opts.get("out") or Path(str(opts["model"])) / "onnx")
    check = record["check"]
    state = "exported" if worked else "up to date, nothing to do:"
    print(f"{state} {out / 'model.onnx'} (opset {record['opset']}, {record['exporter']}; max abs diff "
          f"{check['max_abs_diff']:.3g} <= {check['tolerance']:g} at batch sizes {check['batch_sizes']})")


def _predict(cfg: Config, opts: dict) -> None:
    from pipeline.data.limits import Limits
    from pipeline.serve.predict import predict

    missing = [k for k in ("model", "input", "out") if k not in opts]
    if missing:
        raise ConfigError(f"{missing[0]}=... is required (model=<dir or .onnx> input=<images> out=<.csv|.parquet>)")
    s = predict(str(opts["model"]), str(opts["input"]), str(opts["out"]), topk=int(opts.get("topk", 5)),
                batch_size=int(opts.get("batch_size", 256)), max_bad_share=cfg.data.max_bad_share,
                progress=cfg.progress, limits=Limits.of(cfg.data))
    extra = f"; skipped {s['skipped']} bad image(s), listed in {s['skipped_file']}" if s["skipped"] else ""
    print(f"predicted {s['images']} images with {s['backend']} in {s['seconds']:.1f}s -> {s['out']}{extra}")


_ROUND = "round"
_TRAINING = ("", "data", "model", "teacher", "student", "evaluate")
COMMANDS: dict[str, Command] = {c.name: c for c in (
    Command("prepare", "prepare_data.py", "turn the data source into labeled / val / unlabeled / test shards",
            _prepare, ("", "data")),
    Command("train", "train.py", "train round k: the teacher (round 0) or a noised student (round >= 1)",
            _train, _TRAINING,
            {"role": Option(choice("teacher", "student"), "teacher (round 0) or student (default: teacher)"),
             _ROUND: Option(int_at_least(0), "the round (default: 0 for the teacher, 1 for a student)")}),
    Command("pseudo-label", "pseudo_label.py", "label the pool with round k-1's model (un-noised), split over ranks",
            _pseudo_label, ("", "data", "pseudo_label"),
            {_ROUND: Option(int_at_least(1), "the round whose pseudo labels to make (default: 1)")}),
    Command("iterate", "iterate.py", "run or resume rounds 0..N and print test top-1 per round",
            _iterate, (*_TRAINING, "pseudo_label"),
            {_ROUND: Option(int_at_least(0), "the last round (default: 2)")}),
    Command("distill", "distill.py", "compress a trained model into a smaller one (KD) and report the cost",
            _distill, ("", "data", "distill", "evaluate")),
    Command("evaluate", "evaluate.py", "accuracy, calibration, corruption robustness, health; the report",
            _evaluate, ("", "data", "evaluate"),
            {"models": Option(str, "comma-separated model directories (default: the experiment's rounds)"),
             "test": Option(str, "test images or shards (default: the prepared test split)"),
             "out": Option(str, "where the report goes (default: the experiment's directory)")}),
    Command("export", "export.py", "export a model directory to ONNX, checked against PyTorch",
            _export, (), {"model": Option(str, "the model directory (required)"),
                          "out": Option(str, "output directory (default: <model>/onnx)"),
                          "opset": Option(int_at_least(7), "ONNX opset (default: the exporter's)"),
                          "tolerance": Option(float, "largest allowed difference from PyTorch"),
                          "exporter": Option(choice("dynamo", "torchscript"), "torch's exporter (default: dynamo)")},
            uses_config=False),
    Command("predict", "predict.py", "classify images with a model directory or its ONNX file into CSV/Parquet",
            _predict, (), {"model": Option(str, "a model directory or .onnx file (required)"),
                           "input": Option(str, "a directory, .tar/.tar.gz archive or shard pattern (required)"),
                           "out": Option(str, "a .csv or .parquet file (required)"),
                           "topk": Option(int_at_least(1), "classes per image (default: 5)"),
                           "batch_size": Option(int_at_least(1), "images per batch (default: 256)")}),
)}


def help_text(cmd: Command, prog: str, cfg: Config | None = None) -> str:
    """Usage, the stage's own options and every config key it reads, with the values ``cfg`` (the
    given config file and overrides) would run with."""
    opts = "".join(f" [{k}=...]" for k in cmd.options)
    lines = [f"usage: {prog}{' [--config FILE]' if cmd.uses_config else ''}{opts} [key=value | --key value ...]",
             "", cmd.summary + "."]
    if cmd.options:
        lines += ["", "options:"] + [f"  {k:<22} {o.help}" for k, o in cmd.options.items()]
    if cmd.sections:
        lines += ["", "config keys (--config FILE or a name in configs/; default fashion_mnist; any key below as "
                  "key=value or --key value), with the values this command line would run:",
                  config_help(cmd.sections, cfg)]
    return "\n".join(lines)


def _main_of(cmd: Command, prog: str) -> Callable[[list[str]], int | None]:
    def main(argv: list[str]) -> int | None:
        if any(a in ("-h", "--help") for a in argv):
            rest, cfg = [a for a in argv if a not in ("-h", "--help")], None
            if cmd.uses_config:
                try:
                    cfg = parse_args(rest, {k: o.parse for k, o in cmd.options.items()})[0]
                except ConfigError as e:  # still the help, with the built-in defaults
                    print(f"note: {e}; the values below are the built-in defaults\n")
            print(help_text(cmd, prog, cfg))
            return 0
        cfg, opts = parse_args(argv, {k: o.parse for k, o in cmd.options.items()})
        setup_logging()
        return cmd.body(cfg, opts)
    return main


def run_stage(name: str) -> None:
    """What ``stages/<script>`` runs: the command ``name`` on ``sys.argv[1:]``."""
    cmd = COMMANDS[name]
    run(_main_of(cmd, f"python stages/{cmd.script}"))


def main() -> None:
    """The ``noisy-student`` command (``pip install .``)."""
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        width = max(len(n) for n in COMMANDS)
        print("usage: noisy-student <command> [--config FILE] [key=value | --key value ...]\n\ncommands:\n"
              + "\n".join(f"  {n:<{width}}  {c.summary}" for n, c in COMMANDS.items())
              + "\n\n`noisy-student <command> --help` lists the command's options and config keys.")
        sys.exit(0 if argv else 2)
    cmd = COMMANDS.get(argv[0])
    if cmd is None:
        print(f"error: unknown command {argv[0]!r} (commands: {', '.join(COMMANDS)})", file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"noisy-student {cmd.name}", *argv[1:]]
    run(_main_of(cmd, f"noisy-student {cmd.name}"))


if __name__ == "__main__":
    main()
