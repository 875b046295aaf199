"""Prepare labeled / unlabeled / test webdataset shards from the config's data source.

    python stages/prepare_data.py [--config configs/fashion_mnist.yaml] [data.labeled_per_class=100 ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.cli import parse_args, run  # noqa: E402
from pipeline.data.prepare import load_manifest, prepare  # noqa: E402


def main(argv: list[str]) -> int:
    cfg, _ = parse_args(argv)
    out = prepare(cfg)
    m = load_manifest(out)
    counts = ", ".join(f"{k} {v['count']}" for k, v in m["splits"].items())
    print(f"data ready in {out}: {counts}")
    return 0


if __name__ == "__main__":
    run(main)
