"""Prepare labeled / unlabeled / test webdataset shards from the config's data source.

    python stages/prepare_data.py [--config configs/fashion_mnist.yaml] [data.labeled_per_class=100 ...]
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a clone without installing

from pipeline.commands import run_stage  # noqa: E402

if __name__ == "__main__":
    run_stage("prepare")
