"""Stage entry points: ``[--config FILE] [key=value | --key value ...]``, user errors as one line, exit code 2."""

from __future__ import annotations

import errno
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.config import COMPILE_KEYS, Config, ConfigError, describe, load_config, parse_override
from pipeline.errors import UserError

_REPO_CONFIGS = Path(__file__).resolve().parent.parent / "configs"  # a clone or an editable install
_PACKAGED_CONFIGS = Path(__file__).resolve().parent / "configs"  # a wheel (package data)
CONFIGS = _REPO_CONFIGS if _REPO_CONFIGS.is_dir() else _PACKAGED_CONFIGS
DEFAULT_CONFIG = CONFIGS / "fashion_mnist.yaml"


def find_config(name: str) -> str:
    """A config file as given, or a name of one in ``configs/`` (``cifar10``, ``cifar10.yaml``)."""
    if Path(name).is_file():
        return name
    for cand in (CONFIGS / name, CONFIGS / f"{name}.yaml"):
        if "/" not in name and cand.is_file():
            return str(cand)
    known = ", ".join(sorted(p.stem for p in CONFIGS.glob("*.yaml")))
    raise ConfigError(f"config file not found: {name} (or a name in {CONFIGS}: {known})")


def _arguments(argv: list[str]) -> Iterator[str]:
    """``--key value`` and ``--key=value`` as ``key=value`` (dashes in the key read as underscores)."""
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--") or arg == "--":
            yield arg
            continue
        key, eq, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            value = next(it, None)
            if value is None or value.startswith("--"):
                raise ConfigError(f"--{arg[2:]} needs a value (--{arg[2:]} VALUE or {key}=VALUE)")
        yield f"{key}={value}"


def parse_args(argv: list[str], extras: dict[str, Callable[[str], object]] | None = None
               ) -> tuple[Config, dict[str, object]]:
    """Split ``argv`` into the config (file + overrides) and the stage's own keys (``extras``)."""
    extras = extras or {}
    config_path = str(DEFAULT_CONFIG)
    overrides: list[str] = []
    stage: dict[str, object] = {}
    args = list(argv)
    for i, arg in enumerate(args):  # -c FILE, the short form
        if arg == "-c" and i + 1 < len(args):
            args[i: i + 2] = [f"--config={args[i + 1]}"]
            break
    for arg in _arguments(args):
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r} is not of the form key=value or --key value")
        key, value = parse_override(arg)
        if key == "config":
            config_path = find_config(str(value))
        elif key in extras:
            try:
                stage[key] = extras[key](str(value))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{key}: bad value {value!r} ({e})") from None
        else:
            overrides.append(arg)
    cfg = load_config(config_path, overrides)
    check_backends(cfg)
    return cfg, stage


def check_backends(cfg: Config) -> None:
    """A torch.compile backend named by hand must exist: checked before any work starts (torch is
    imported only then); the library checks it again where it compiles."""
    for key in COMPILE_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if isinstance(value, str) and value != "inductor":
            from pipeline.modeling.precision import check_compile

            check_compile(value, key)


def config_help(sections: tuple[str, ...], cfg: Config | None = None) -> str:
    """One line per key of the config ``sections`` ("" = top level): dotted key, type, the value
    ``cfg`` would run with (the built-in default beside it where they differ), meaning."""
    defaults = {r[0]: r[2] for r in describe(Config())}
    rows = [r for r in describe(cfg or Config()) if (r[0].split(".")[0] if "." in r[0] else "") in sections]
    rows = [(k, t, v if v == defaults[k] else f"{v} (default {defaults[k]})", h) for k, t, v, h in rows]
    width = max(len(r[0]) for r in rows)
    tw = min(max(len(r[1]) for r in rows), 28)
    return "\n".join(f"  {k:<{width}}  {t:<{tw}}  {d:<12}  {h}" for k, t, d, h in rows)


def run(main: Callable[[list[str]], int | None]) -> None:
    """Call ``main(sys.argv[1:])``; a UserError prints one line and exits 2, not a traceback."""
    code = 0
    try:
        code = main(sys.argv[1:]) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except OSError as e:
        if e.errno not in _ENVIRONMENT:
            raise
        print(f"error: {e.filename or 'a write'}: {os.strerror(e.errno).lower()} (rerun the same command once "
              "it is fixed: finished work is kept)", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        code = 130
    finally:
        _shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


# what the machine, not the code, got wrong: one line naming the file, not a traceback
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS}


def _shutdown() -> None:
    if "torch" not in sys.modules:  # nothing to tear down (--help, a bad option): do not import it now
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - best effort at exit
        pass


def int_at_least(lo: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        v = int(text)
        if v < lo:
            raise ValueError(f"must be >= {lo}")
        return v
    return parse


def choice(*options: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return text
    return parse
