import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError, StudentConfig
from pipeline.pseudo import pseudo_labels as pl
from pipeline.pseudo import selection
from pipeline.training.objectives import Batch, NoisyStudent, soft_cross_entropy

NAMES = ["a", "b", "c"]


def _write(tmp_path, shard, keys, probs, sha="t" * 64, names=NAMES):
    pl.write_parquet(tmp_path / pl.parquet_name(shard), shard, keys, np.asarray(probs, np.float32), sha, names)


def test_parquet_round_trip_and_metadata(tmp_path):
    probs = [[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]]
    _write(tmp_path, "unlabeled-000000.tar", ["k1", "k2"], probs)
    path = tmp_path / "unlabeled-000000.parquet"
    t = pq.read_table(path)
    assert t.column("key").to_pylist() == ["k1", "k2"]
    assert t.column("shard").to_pylist() == ["unlabeled-000000.tar"] * 2
    assert t.column("label").to_pylist() == [0, 2]
    assert t.column("confidence").to_pylist() == pytest.approx([0.7, 0.8])
    assert np.allclose(np.asarray(t.column("probs").to_pylist()), probs)
    ptype = t.schema.field("probs").type
    assert ptype.list_size == 3 and str(ptype.value_type) == "float"
    meta = pl.read_meta(path)
    assert meta == {"teacher_sha256": "t" * 64, "class_names": NAMES, "rows": 2, "tta": False, "precision": "fp32",
                    "skipped": [], "skipped_count": 0}
    assert pl.validates(path, 2, "t" * 64, NAMES)
    assert not pl.validates(path, 3, "t" * 64, NAMES)
    assert not pl.validates(path, 2, "u" * 64, NAMES)
    assert not pl.validates(path, 2, "t" * 64, ["a", "b", "x"])
    path.write_bytes(path.read_bytes()[:50])  # truncated file never validates
    assert not pl.validates(path, 2, "t" * 64, NAMES)
    assert not list(tmp_path.glob(".tmp-*"))


def test_select_threshold_and_balance_by_hand():
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    conf = np.array([0.9, 0.8, 0.7, 0.2, 0.95, 0.6, 0.5, 0.1])
    rep, info = selection.select(labels, conf, 3, threshold=0.3, balance=False, per_class=None)
    assert rep.tolist() == [1, 1, 1, 0, 1, 1, 1, 0]
    assert info["kept_per_class"] == [3, 2, 1]
    # balance to the mean kept count (2): class 0 keeps its 2 most confident, class 2 is duplicated
    rep, info = selection.select(labels, conf, 3, threshold=0.3, balance=True, per_class=None)
    assert rep.tolist() == [1, 1, 0, 0, 1, 1, 2, 0]
    assert info["per_class_target"] == 2 and info["samples"] == 6
    # explicit target 5: class 1 (2 kept) -> 3 + 2 copies, the more confident gets the extra
    rep, _ = selection.select(labels, conf, 3, threshold=0.3, balance=True, per_class=5)
    assert rep.tolist() == [2, 2, 1, 0, 3, 2, 5, 0]


def test_soft_targets_temperature():
    p = np.array([[0.6, 0.3, 0.1]], np.float32)
    assert np.allclose(selection.soft_targets(p, 1.0), p)
    sharp = selection.soft_targets(p, 0.5)
    expected = p ** 2 / (p ** 2).sum()
    assert np.allclose(sharp, expected, atol=1e-6)
    flat = selection.soft_targets(p, 100.0)
    assert np.allclose(flat, 1 / 3, atol=0.01)


def test_student_targets_join_by_key(tmp_path):
    shards = [tmp_path / "unlabeled-000000.tar", tmp_path / "unlabeled-000001.tar"]
    _write(tmp_path, shards[0].name, ["a0", "a1"], [[0.9, 0.05, 0.05], [0.2, 0.5, 0.3]])
    _write(tmp_path, shards[1].name, ["b0", "b1"], [[0.1, 0.1, 0.8], [0.34, 0.33, 0.33]])
    cfg = StudentConfig(threshold=0.4, balance=False, soft=True)
    targets, info = selection.student_targets(tmp_path, shards, cfg, 3)
    assert info["kept"] == 3 and targets.total == 3
    t0 = targets(str(shards[0]))
    assert set(t0) == {"a0", "a1"} and t0["a0"][0] == 1
    assert torch.allclose(t0["a1"][1], torch.tensor([0.2, 0.5, 0.3]))
    assert set(targets(str(shards[1]))) == {"b0"}
    hard, _ = selection.student_targets(tmp_path, shards, StudentConfig(threshold=0.4, balance=False, soft=False), 3)
    assert hard(str(shards[0]))["a1"][1].tolist() == [0.0, 1.0, 0.0]
    with pytest.raises(ConfigError, match="keeps no pseudo-labeled sample"):
        selection.student_targets(tmp_path, shards, StudentConfig(threshold=0.99, balance=False), 3)


def test_check_rejects_mismatches(tmp_path):
    shard = "unlabeled-000000.tar"
    _write(tmp_path, shard, ["a", "b"], [[1, 0, 0], [0, 1, 0]])
    pl.write_manifest(tmp_path, [tmp_path / shard], tmp_path, "t" * 64, NAMES, {}, "d")
    assert pl.check(tmp_path, {shard: 2}, "t" * 64, NAMES)["files"][0]["rows"] == 2
    with pytest.raises(ConfigError, match="another teacher"):
        pl.check(tmp_path, {shard: 2}, "x" * 64, NAMES)
    with pytest.raises(ConfigError, match="classes"):
        pl.check(tmp_path, {shard: 2}, "t" * 64, ["a", "b"])
    with pytest.raises(ConfigError, match="has 3"):
        pl.check(tmp_path, {shard: 3}, "t" * 64, NAMES)
    with pytest.raises(ConfigError, match="lack shard"):
        pl.check(tmp_path, {shard: 2, "unlabeled-000001.tar": 1}, "t" * 64, NAMES)
    with pytest.raises(ConfigError, match="the data lacks"):
        pl.check(tmp_path, {}, "t" * 64, NAMES)


def test_labels_made_with_another_tta_setting_are_not_reused(tmp_path):
    shard = "unlabeled-000000.tar"
    path = tmp_path / pl.parquet_name(shard)
    pl.write_parquet(path, shard, ["k1"], np.asarray([[0.6, 0.3, 0.1]], np.float32), "t" * 64, NAMES, tta=True)
    assert pl.validates(path, 1, "t" * 64, NAMES, tta=True)
    assert not pl.validates(path, 1, "t" * 64, NAMES, tta=False)  # a rerun relabels it
    pl.write_manifest(tmp_path, [tmp_path / shard], tmp_path, "t" * 64, NAMES, {}, "d", tta=True)
    assert pl.check(tmp_path, {shard: 1}, "t" * 64, NAMES, tta=True)["tta"] == "hflip"
    with pytest.raises(ConfigError, match="pseudo_label.tta"):
        pl.check(tmp_path, {shard: 1}, "t" * 64, NAMES, tta=False)


def test_soft_cross_entropy_matches_hard_ce_for_one_hot():
    logits = torch.randn(5, 4)
    y = torch.tensor([0, 3, 1, 1, 2])
    onehot = torch.nn.functional.one_hot(y, 4).float()
    assert torch.allclose(soft_cross_entropy(logits, onehot), torch.nn.functional.cross_entropy(logits, y))
    # by hand for one row
    lg = torch.tensor([[1.0, 2.0]])
    t = torch.tensor([[0.25, 0.75]])
    lse = torch.logsumexp(lg, 1)
    manual = -(0.25 * (1.0 - lse) + 0.75 * (2.0 - lse))
    assert torch.allclose(soft_cross_entropy(lg, t), manual)


def test_student_mixup_mixes_each_group_within_itself():
    torch.manual_seed(0)
    n, m = 4, 12
    x = torch.cat([torch.zeros(n, 3, 2, 2), torch.ones(m, 3, 2, 2)])  # labeled 0, pseudo-labeled 1
    labels = torch.full((n,), 2)
    soft = torch.tensor([[0.1, 0.2, 0.7]]).repeat(m, 1)
    batch = Batch(x, labels, n, soft)
    plain, mixed = NoisyStudent(0.1, 0.5), NoisyStudent(0.1, 0.5, mixup=1.0)
    assert plain.inputs(x, batch) is x
    lams = set()
    for _ in range(5):
        xm = mixed.inputs(x, batch)
        lams.add(mixed.lam)
        # a labeled image is mixed only with labeled ones, a pseudo-labeled one with pseudo-labeled ones
        assert torch.equal(xm[:n], x[:n]) and torch.equal(xm[n:], x[n:])
        # with one target per group, mixing the targets changes nothing: same loss as without mixup
        logits = torch.randn(n + m, 3)
        assert torch.allclose(mixed.loss(logits, batch), plain.loss(logits, batch), atol=1e-6)
    assert len(lams) == 5 and all(0 < lam < 1 for lam in lams)
    # different targets are mixed with the same weight as the images
    x = torch.randn(n + m, 3, 2, 2)
    batch = Batch(x, torch.tensor([0, 1, 2, 0]), n, torch.softmax(torch.randn(m, 3), 1))
    xm = mixed.inputs(x, batch)
    j = mixed.perm[n]
    assert torch.allclose(xm[n], mixed.lam * x[n] + (1 - mixed.lam) * x[j])
    logits = torch.zeros(n + m, 3)
    logits[n:] = torch.randn(m, 3)
    expected_soft = mixed.lam * batch.soft + (1 - mixed.lam) * batch.soft[mixed.perm[n:] - n]
    uniform = torch.nn.functional.cross_entropy(logits[:n], batch.labels, label_smoothing=0.1)  # any label
    assert torch.allclose(mixed.loss(logits, batch), uniform + 0.5 * soft_cross_entropy(logits[n:], expected_soft))
