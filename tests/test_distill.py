"""Knowledge distillation: the loss against hand-worked values, the online batch, offline targets, the stage."""

import json
import math

import pytest
import torch
from conftest import stage, tiny_overrides

from pipeline.compress.distill import OnlineKD, kd_loss
from pipeline.training.objectives import Batch


def test_kd_loss_hand_computed():
    # one unlabeled sample, 2 classes, T=1: teacher logits (0, 0) -> p_t = (.5, .5);
    # student logits (ln 3, 0) -> p_s = (.75, .25); KL = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3)
    s = torch.tensor([[math.log(3.0), 0.0]])
    t = torch.zeros(1, 2)
    assert kd_loss(s, t, torch.tensor([-1]), 1.0, 0.5).item() == pytest.approx(0.5 * math.log(4 / 3), rel=1e-6)
    # labeled with label 1, alpha=0.25: 0.25 KL + 0.75 CE, CE = -ln .25
    want = 0.25 * 0.5 * math.log(4 / 3) + 0.75 * -math.log(0.25)
    assert kd_loss(s, t, torch.tensor([1]), 1.0, 0.25).item() == pytest.approx(want, rel=1e-6)
    # batch mean over both samples
    both = kd_loss(s.repeat(2, 1), t.repeat(2, 1), torch.tensor([-1, 1]), 1.0, 0.25).item()
    assert both == pytest.approx((0.5 * math.log(4 / 3) + want) / 2, rel=1e-6)


def test_kd_loss_temperature_squared_and_alpha_limits():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 5, generator=g), torch.randn(8, 5, generator=g)
    y = torch.tensor([0, 1, 2, 3, 4, -1, -1, -1])
    unl = torch.full((8,), -1)
    T = 3.0
    kl_T = torch.nn.functional.kl_div(torch.log_softmax(s / T, 1), torch.log_softmax(t / T, 1), log_target=True,
                                      reduction="batchmean").item()
    assert kd_loss(s, t, unl, T, 0.5).item() == pytest.approx(T * T * kl_T, rel=1e-5)  # T^2 scaling
    ce = torch.nn.functional.cross_entropy(s[:5], y[:5], reduction="sum").item()
    kl_each = (T * T) * (torch.softmax(t / T, 1) * (torch.log_softmax(t / T, 1) - torch.log_softmax(s / T, 1))).sum(1)
    # alpha = 0: labeled samples are pure CE, unlabeled ones still KD
    assert kd_loss(s, t, y, T, 0.0).item() == pytest.approx((ce + kl_each[5:].sum().item()) / 8, rel=1e-5)
    # alpha = 1: every sample is pure KD, labels ignored
    assert kd_loss(s, t, y, T, 1.0).item() == pytest.approx(kl_each.mean().item(), rel=1e-5)
    # a student equal to its teacher has zero KD loss
    assert kd_loss(t, t, unl, T, 0.9).item() == pytest.approx(0.0, abs=1e-6)


class _Recorder(torch.nn.Module):
    def __init__(self, out: int = 4):
        super().__init__()
        self.lin = torch.nn.Linear(16 * 16, out)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.lin(x.float().flatten(1))


def test_online_teacher_sees_the_students_batch():
    """inputs() runs the teacher on exactly the tensor the student is then given, mixup included."""
    teacher, student = _Recorder(), _Recorder()
    kd = OnlineKD(teacher, 2.0, 0.5, mixup=0.4)
    torch.manual_seed(0)
    for _ in range(3):
        x = torch.randn(6, 1, 16, 16)
        y = torch.tensor([0, 1, -1, -1, 2, 3])
        batch = Batch(x, y, len(x))
        xm = kd.inputs(x, batch)
        loss = kd.loss(student(xm), batch)
        loss.backward()
        assert torch.equal(teacher.seen[-1], student.seen[-1])
        assert not torch.equal(xm, x)  # mixup changed the batch, for both models alike
        assert kd.labels_b is not None and 0 <= kd.lam <= 1
    assert all(p.grad is None for p in teacher.parameters())


@pytest.fixture(scope="module")
def teacher(tiny_data, tmp_path_factory):
    runs = tmp_path_factory.mktemp("kd") / "runs"
    ov = tiny_overrides(tiny_data, runs, name="kd") + ["teacher.epochs=20"]
    stage("iterate.py", "round=0", *ov)
    return {"ov": ov, "exp": runs / "kd"}


DISTILL = ["distill.arch=test_resnet", "distill.channels=null", "distill.temperature=4", "distill.epochs=2", "distill.batch_size=16", "distill.workers=0",
           "distill.hflip=false", "distill.crop_pad=0", "distill.warmup_epochs=0", "distill.lr=0.003"]


def test_distill_online_with_baseline_and_report(teacher):
    r = stage("distill.py", *teacher["ov"], *DISTILL, "distill.name=kd1", "distill.mixup=0.2")
    out = teacher["exp"] / "distilled" / "kd1"
    for f in ("config.json", "model.safetensors", "card.json", "compression.json", "compression.md"):
        assert (out / f).is_file(), f
    rep = json.loads((out / "compression.json").read_text())
    t, s = rep["teacher"], rep["student"]
    assert s["params"] < t["params"] / 4 and s["macs"] < t["macs"]
    for side in (t, s):
        assert side["latency_ms_b1"] > 0 and side["img_s_b64"] > 0 and side["file_bytes"] > 0
    assert rep["retained"] == pytest.approx(100 * s["test_top1"] / t["test_top1"], abs=0.01)
    assert s["test_top1"] > 50  # 4 classes: chance is 25 %
    lo = json.loads((teacher["exp"] / "distilled" / "kd1-labels-only" / "card.json").read_text())
    assert rep["labels_only_top1"] == lo["metrics"]["test_top1"]
    # the labels-only baseline had the distillation's budget: the same number of steps x batch
    kd_card = json.loads((out / "card.json").read_text())
    assert lo["train"][0]["steps"] >= kd_card["train"][0]["steps"]
    assert lo["train"][0]["steps"] - kd_card["train"][0]["steps"] < 1000 // 16
    assert "retained" in r.stdout
    # rerun: nothing trained again; a changed setting under the same name is refused
    before = (out / "model.safetensors").stat().st_mtime_ns
    stage("distill.py", *teacher["ov"], *DISTILL, "distill.name=kd1", "distill.mixup=0.2")
    assert (out / "model.safetensors").stat().st_mtime_ns == before
    r = stage("distill.py", *teacher["ov"], *DISTILL, "distill.name=kd1", "distill.mixup=0.2",
              "distill.temperature=3", check=False)
    assert r.returncode == 2 and "distill.temperature" in r.stderr and "Traceback" not in r.stderr


def test_distill_offline_targets_and_their_check(teacher):
    ov = [*teacher["ov"], *DISTILL, "distill.name=kd2", "distill.mode=offline", "distill.labels_only=false"]
    stage("distill.py", *ov)
    tdir = teacher["exp"] / "distilled" / "kd2" / "targets"
    assert len(list(tdir.glob("labeled-*.parquet"))) == 1 and len(list(tdir.glob("unlabeled-*.parquet"))) == 4
    card = json.loads((teacher["exp"] / "distilled" / "kd2" / "card.json").read_text())
    assert card["mode"] == "offline" and card["metrics"]["test_top1"] > 50
    # targets made for other classes are refused before a single step
    import shutil

    other = teacher["exp"] / "distilled" / "kd3" / "targets"
    shutil.copytree(tdir, other)
    manifest = json.loads((other / "_manifest.json").read_text())
    manifest["class_names"] = ["a", "b", "c", "d"]
    (other / "_manifest.json").write_text(json.dumps(manifest))
    r = stage("distill.py", *[o for o in ov if not o.startswith("distill.name")], "distill.name=kd3",
              check=False)
    assert r.returncode == 2 and "classes" in r.stderr and "Traceback" not in r.stderr
    assert not (other.parent / "state").exists()


def test_distill_refuses_a_student_that_is_not_smaller(teacher):
    r = stage("distill.py", *teacher["ov"], "distill.arch=resnet18", "distill.channels=null", "distill.name=big",
              check=False)
    assert r.returncode == 2 and "not fewer" in r.stderr
