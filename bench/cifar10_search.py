"""Fast recipe search for CIFAR-10 with 4,000 labels: the whole data set decoded once into memory,
batch augmentation on uint8 tensors, validation accuracy only (the test images are never loaded).

Each run trains a teacher (no ``--teacher``) or a student of a saved teacher on the pool, and prints
validation top-1 (flip-averaged, and plain at the end). Its split is its own (seeded: 400 labeled,
500 validation per class, the rest the pool), so figures compare runs of this script, not runs of
the pipeline; the choices it made are recorded in bench/results/cifar10_recipes.json.

    python bench/cifar10_search.py --epochs 80 --cutout 8 --save runs/search/t80c
    python bench/cifar10_search.py --teacher runs/search/t80c --init --epochs 6 --cutout 8 --temp 0.5
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from pipeline.data.sources import archive_mirror  # noqa: E402
from pipeline.modeling.archs import Cnn32  # noqa: E402
from pipeline.noise import _RandAugment  # noqa: E402

CACHE = Path("runs/search/cifar10-train.npz")


def load_train() -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, 32, 32) uint8 images and labels of the training archive, decoded once and cached."""
    if not CACHE.is_file():
        path = archive_mirror("CIFAR10", True, None)
        if path is None:
            sys.exit("CIFAR-10 training archive not found (../shared/data/cifar10/train.tar.gz)")
        xs, ys, classes = [], [], []
        with tarfile.open(path) as tf:
            members = sorted((m for m in tf if m.isfile()), key=lambda m: m.name)
            classes = sorted({m.name.split("/")[-2] for m in members})
            for m in members:
                xs.append(np.asarray(Image.open(io.BytesIO(tf.extractfile(m).read())).convert("RGB")))
                ys.append(classes.index(m.name.split("/")[-2]))
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        np.savez(CACHE, x=np.stack(xs), y=np.array(ys))
    d = np.load(CACHE)
    return torch.from_numpy(d["x"]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(d["y"]).long()


class Plain(nn.Module):
    """cnn32 without the residual connection in its groups (the first runs of the search used it)."""

    def __init__(self, widths, depth, drop=0.0):
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 2)
        self.stem_bn = nn.BatchNorm2d(24)
        layers, cin = [], 24
        for w in widths:
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.MaxPool2d(2), nn.BatchNorm2d(w), nn.GELU()]
            for _ in range(depth - 1):
                layers += [nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.GELU()]
            cin = w
        self.groups = nn.Sequential(*layers)
        self.drop = nn.Dropout(drop)
        self.fc = nn.Linear(cin, 10, bias=False)

    def forward(self, x):
        x = self.groups(F.gelu(self.stem_bn(self.stem(x))))
        return self.fc(self.drop(torch.amax(x, dim=(2, 3)))) / 9


def build(spec: dict) -> nn.Module:
    widths, depth = tuple(spec["widths"]), spec["depth"]
    if spec.get("plain"):
        net = Plain(widths, depth, spec.get("drop", 0.0))
    else:
        net = Cnn32(widths, depth, num_classes=10, drop_rate=spec.get("drop", 0.0),
                    drop_path_rate=spec.get("drop_path", 0.0), flip_tta=False)
    return net.to(memory_format=torch.channels_last)


def augment(x: torch.Tensor, cutout: int, ra: str) -> torch.Tensor:
    """Flip, 2-px reflect-padded translate, optional RandAugment (per image, PIL) and a cutout square."""
    if ra:
        n_ops, mag = map(int, ra.split(","))
        op = _RandAugment(num_ops=n_ops, magnitude=mag, num_magnitude_bins=31)
        x = torch.stack([torch.from_numpy(np.array(op(Image.fromarray(a)))) for a in x.permute(0, 2, 3, 1).numpy()])
        x = x.permute(0, 3, 1, 2).contiguous()
    n = len(x)
    x = torch.where((torch.rand(n) < 0.5).view(-1, 1, 1, 1), x.flip(3), x)
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    dx, dy = torch.randint(0, 5, (n,)), torch.randint(0, 5, (n,))
    out = torch.empty_like(x)
    for i in range(5):
        for j in range(5):
            m = (dx == i) & (dy == j)
            if m.any():
                out[m] = padded[m, :, j:j + 32, i:i + 32]
    if cutout:
        cy, cx = torch.randint(0, 32, (n, 1, 1)), torch.randint(0, 32, (n, 1, 1))
        yy, xx = torch.arange(32).view(1, 32, 1), torch.arange(32).view(1, 1, 32)
        box = ((yy - cy).abs() <= cutout // 2) & ((xx - cx).abs() <= cutout // 2)
        out = out.masked_fill(box.unsqueeze(1), 0)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--widths", default="32,128,128")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--plain", action="store_true", help="groups without the residual connection")
    p.add_argument("--res-one", action="store_true", help="residual units' BN weight starts at 1, not 0")
    p.add_argument("--epochs", type=float, default=40, help="teacher: passes over the labels; student: over the pool")
    p.add_argument("--bs", type=int, default=128, help="labeled images per step")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--wd", type=float, default=5e-4)
    p.add_argument("--ls", type=float, default=0.2, help="label smoothing of the labeled loss")
    p.add_argument("--cutout", type=int, default=0, help="side of the zeroed square (0: off)")
    p.add_argument("--ra", default="", help="RandAugment 'N,M' on the pool images (students)")
    p.add_argument("--drop", type=float, default=0.0)
    p.add_argument("--drop-path", type=float, default=0.0)
    p.add_argument("--teacher", default=None, help="a saved teacher: train a student on the pool")
    p.add_argument("--ratio", type=int, default=3, help="pool images per labeled image in a step")
    p.add_argument("--hard", type=float, default=-1, help="hard labels kept above this confidence; -1: soft")
    p.add_argument("--temp", type=float, default=1.0, help="soft-target temperature")
    p.add_argument("--init", action="store_true", help="start the student from the teacher's weights")
    p.add_argument("--save", default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.manual_seed(a.seed)
    x, y = load_train()
    rng = np.random.RandomState(0)
    lab, val, pool = [], [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y.numpy() == c))
        lab += list(idx[:400])
        val += list(idx[400:900])
        pool += list(idx[900:])
    lab, val, pool = (torch.tensor(v) for v in (lab, val, pool))
    mean = x[lab].float().mean((0, 2, 3)).view(1, 3, 1, 1) / 255
    std = x[lab].float().std((0, 2, 3)).view(1, 3, 1, 1) / 255

    def norm(b):
        return ((b.float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def probs(m, idx, flip=True):
        m.eval()
        out = []
        for i in range(0, len(idx), 1000):
            b = norm(x[idx[i:i + 1000]])
            out.append((m(b).softmax(1) + m(b.flip(3)).softmax(1)) / 2 if flip else m(b).softmax(1))
        m.train()
        return torch.cat(out)

    def accuracy(m, idx, flip=True):
        return (probs(m, idx, flip).argmax(1) == y[idx]).float().mean().item()

    spec = {"widths": [int(w) for w in a.widths.split(",")], "depth": a.depth, "plain": a.plain, "drop": a.drop,
            "drop_path": a.drop_path}
    targets = None
    if a.teacher:
        tspec = json.loads(Path(a.teacher + ".json").read_text())
        teacher = build(tspec)
        teacher.load_state_dict(torch.load(a.teacher + ".pt", weights_only=True))
        t0 = time.time()
        pp = probs(teacher, pool)
        print(f"pseudo-label acc {(pp.argmax(1) == y[pool]).float().mean():.4f} conf {pp.max(1)[0].mean():.3f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        if a.temp != 1.0:
            pp = (pp.clamp_min(1e-12).log() / a.temp).softmax(1)
        upool, targets = pool, pp
        if a.hard >= 0:
            keep = pp.max(1)[0] >= a.hard
            upool, targets = pool[keep], F.one_hot(pp.argmax(1)[keep], 10).float()
            print(f"kept {keep.float().mean():.3f}", flush=True)
        if a.init:
            spec = {**spec, "plain": tspec.get("plain", False)}
    model = build(spec)
    if a.res_one:
        for mod in model.modules():
            if hasattr(mod, "bn") and hasattr(mod, "conv"):
                torch.nn.init.ones_(mod.bn.weight)
    if a.teacher and a.init:
        model.load_state_dict(teacher.state_dict(), strict=False)
    decay = [q for q in model.parameters() if q.ndim > 1]
    no_decay = [q for q in model.parameters() if q.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay, "weight_decay": a.wd}, {"params": no_decay, "weight_decay": 0}],
                          lr=a.lr, momentum=0.9, nesterov=True)
    spe = len(lab) // a.bs if targets is None else len(upool) // (a.bs * a.ratio)
    total = int(spe * a.epochs)
    warm = max(1, total // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (
        1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator().manual_seed(a.seed)
    lperm, li, uperm, ui = torch.randperm(len(lab), generator=g), 0, None, 0
    t0 = time.time()
    for step in range(total):
        if li + a.bs > len(lab):
            lperm, li = torch.randperm(len(lab), generator=g), 0
        bi = lab[lperm[li:li + a.bs]]
        li += a.bs
        xb = augment(x[bi], a.cutout, "")
        yb = F.one_hot(y[bi], 10).float() * (1 - a.ls) + a.ls / 10
        if targets is not None:
            nu = a.bs * a.ratio
            if uperm is None or ui + nu > len(upool):
                uperm, ui = torch.randperm(len(upool), generator=g), 0
            j = uperm[ui:ui + nu]
            ui += nu
            xb = torch.cat([xb, augment(x[upool[j]], a.cutout, a.ra)])
        logits = model(norm(xb)).float()
        loss = -(yb * logits[:len(bi)].log_softmax(1)).sum(1).mean()
        if targets is not None:
            loss = loss - (targets[j] * logits[len(bi):].log_softmax(1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if (step + 1) % max(1, total // 5) == 0 or step + 1 == total:
            print(f"step {step + 1}/{total} loss {loss.item():.3f} val {accuracy(model, val):.4f} "
                  f"{time.time() - t0:.0f}s {(step + 1) * len(xb) / (time.time() - t0):.0f} img/s", flush=True)
    if a.save:
        Path(a.save).parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), a.save + ".pt")
        Path(a.save + ".json").write_text(json.dumps(spec))
    print(f"final val {accuracy(model, val):.4f} (no flip: {accuracy(model, val, False):.4f}) "
          f"time {time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
