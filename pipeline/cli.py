"""Stage entry points: ``[--config FILE] [key=value ...]``, user errors as one line, exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.config import Config, ConfigError, load_config, parse_override
from pipeline.errors import UserError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "fashion_mnist.yaml"


def parse_args(argv: list[str], extras: dict[str, Callable[[str], object]] | None = None
               ) -> tuple[Config, dict[str, object]]:
    """Split ``argv`` into the config (file + overrides) and the stage's own keys (``extras``)."""
    extras = extras or {}
    config_path: str | None = str(DEFAULT_CONFIG)
    overrides: list[str] = []
    stage: dict[str, object] = {}
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            config_path = next(it, None)
            if config_path is None:
                raise ConfigError("--config needs a file name")
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
        elif arg in ("-h", "--help"):
            keys = " ".join(f"{k}=..." for k in extras)
            print(f"usage: [--config FILE] {keys} [section.key=value ...]  (default config: {DEFAULT_CONFIG})")
            sys.exit(0)
        else:
            key, value = parse_override(arg)
            if key == "config":
                config_path = str(value)
            elif key in extras:
                try:
                    stage[key] = extras[key](str(value))
                except (TypeError, ValueError) as e:
                    raise ConfigError(f"{key}: bad value {value!r} ({e})") from None
            else:
                overrides.append(arg)
    return load_config(config_path, overrides), stage


def run(main: Callable[[list[str]], int | None]) -> None:
    """Call ``main(sys.argv[1:])``; a UserError prints one line and exits 2, not a traceback."""
    code = 0
    try:
        code = main(sys.argv[1:]) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        code = 130
    finally:
        _shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    sys.exit(code)


def _shutdown() -> None:
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
