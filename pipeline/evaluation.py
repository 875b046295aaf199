"""Clean test metrics: top-1 on a shard split, summed over ranks (no padded duplicates)."""

from __future__ import annotations

import torch
from tqdm import tqdm

from .loaders import eval_batches
from .transforms import eval_transform, normalize


def top1(model: torch.nn.Module, shards: list[str], prep: dict, accelerator, batch_size: int = 512,
         workers: int = 1, progress: bool = True, desc: str = "evaluate") -> dict:
    """Top-1 accuracy (percent) of ``model`` on ``shards``; every rank reads its own share."""
    device = accelerator.device
    model = model.to(device).eval()
    mean, std = torch.tensor(prep["mean"], device=device), torch.tensor(prep["std"], device=device)
    loader = eval_batches([str(s) for s in shards], prep["mode"], eval_transform(prep["size"]), batch_size,
                          workers, accelerator.process_index, accelerator.num_processes)
    correct = torch.zeros((), dtype=torch.long, device=device)
    count = torch.zeros((), dtype=torch.long, device=device)
    with torch.inference_mode():
        for x, y in tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False):
            pred = model(normalize(x.to(device), mean, std)).argmax(1)
            correct += (pred == y.to(device)).sum()
            count += len(y)
    correct, count = accelerator.reduce(correct, "sum"), accelerator.reduce(count, "sum")
    return {"test_top1": round(100.0 * correct.item() / max(count.item(), 1), 3), "test_samples": count.item()}
