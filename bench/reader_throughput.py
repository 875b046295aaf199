"""Our tar reader (``shards.read_shard``) against webdataset's on prepared shards: samples read and
decoded per second, one process, the same decoder behind both (``images.decode_tensor``), so the
difference is the reading. Alternating runs (a b b a ...), CPU named in the result.

    python bench/reader_throughput.py runs/data/cifar10-<hash> runs/data/fashionmnist-<hash> --repeats 3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import webdataset as wds

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from collect_iterate import machine  # noqa: E402
from common import RESULTS, alternate, summary, versions  # noqa: E402

from pipeline.data.images import decode_tensor  # noqa: E402
from pipeline.data.shards import image_bytes, read_shard  # noqa: E402


def _timed(shards: list[str], mode: str, ours: bool) -> float:
    n, t0 = 0, time.perf_counter()
    if ours:
        samples = (s for url in shards for s in read_shard(url) if isinstance(s, dict))
    else:
        samples = iter(wds.WebDataset(shards, shardshuffle=False, empty_check=False))
    for s in samples:
        if decode_tensor(image_bytes(s), mode) is not None:
            n += 1
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data_dirs", nargs="+", type=Path, help="prepared data directories (runs/data/...)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="reader_throughput")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"what": __doc__.split("\n\n")[0], "machine": machine(), "versions": versions(),
              "command": "python bench/reader_throughput.py " + " ".join(sys.argv[1:]), "datasets": {}}
    for d in args.data_dirs:
        manifest = json.loads((d / "manifest.json").read_text())
        shards = [str(d / e["file"]) for split in ("labeled", "val", "unlabeled", "test")
                  for e in manifest["splits"].get(split, {}).get("shards", [])]
        mode = manifest["image"]["mode"]
        print(f"{d.name}: {len(shards)} shards, mode {mode}", flush=True)
        runs = alternate({"ours": lambda s=shards, m=mode: _timed(s, m, True),
                          "webdataset": lambda s=shards, m=mode: _timed(s, m, False)}, repeats=args.repeats)
        out = summary(runs)
        out["webdataset_over_ours"] = round(out["webdataset"]["median_img_s"] / out["ours"]["median_img_s"], 3)
        result["datasets"][d.name] = out
    path = RESULTS / f"{args.out}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["datasets"], indent=2))


if __name__ == "__main__":
    main()
