import json

import pytest
import timm
import torch

from pipeline.config import ConfigError, ModelConfig
from pipeline.modeling import models


def test_model_dir_rebuilds_through_timm_local_dir(tmp_path):
    m = models.create_model("resnet10t", num_classes=3, in_chans=1, drop_rate=0.2, drop_path_rate=0.1)
    m.eval()
    hashes = models.save_model_dir(m, tmp_path, ["x", "y", "z"], [0.3], [0.2], 16, 1)
    assert set(hashes) == {"model.safetensors", "config.json"}
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == "resnet10t" and cfg["num_classes"] == 3
    assert cfg["label_names"] == ["x", "y", "z"]
    assert cfg["pretrained_cfg"]["mean"] == [0.3] and cfg["pretrained_cfg"]["input_size"] == [1, 16, 16]
    assert cfg["model_args"]["in_chans"] == 1
    x = torch.randn(4, 1, 16, 16)
    again = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    ours, _ = models.load_model_dir(tmp_path)
    with torch.no_grad():
        assert torch.equal(m(x), again(x)) and torch.equal(m(x), ours(x))
    assert models.preprocessing(cfg).as_dict() == {"mode": "L", "size": 16, "mean": [0.3], "std": [0.2]}
    assert not list(tmp_path.glob(".tmp-*"))


def test_student_ladder_and_explicit_students():
    mc = ModelConfig(arch="resnet10t", ladder="resnet")
    assert models.student_arch(mc, 1, "resnet10t") == "resnet18"
    assert models.student_arch(mc, 2, "resnet18") == "resnet26"
    assert models.student_arch(ModelConfig(ladder="efficientnet"), 1, "efficientnet_b0") == "efficientnet_b1"
    assert models.student_arch(ModelConfig(ladder="resnet"), 9, "resnet101") == "resnet101"
    explicit = ModelConfig(students=["resnet18", "resnet34"])
    assert [models.student_arch(explicit, k, "x") for k in (1, 2, 3)] == ["resnet18", "resnet34", "resnet34"]
    assert models.student_arch(ModelConfig(ladder=None), 1, "resnet50") == "resnet50"
    with pytest.raises(ConfigError, match="unknown ladder"):
        models.student_arch(ModelConfig(ladder="nope"), 1, "resnet10t")
    with pytest.raises(ConfigError, match="not a timm model"):
        models.student_arch(ModelConfig(students=["resnet_oops"]), 1, "resnet10t")


def test_noise_switches_reach_the_model():
    m = models.create_model("resnet18", 10, 3, drop_rate=0.3, drop_path_rate=0.2)
    assert m.drop_rate == 0.3
    rates = [b.drop_path.drop_prob for b in m.modules() if hasattr(b, "drop_path") and hasattr(
        b.drop_path, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.2)


def test_random_erasing_blanks_one_box_when_switched_on():
    import numpy as np
    from PIL import Image

    from pipeline.config import RandAugmentConfig, StudentConfig
    from pipeline.data import noise
    from pipeline.data.transforms import train_transform

    img = Image.fromarray(np.full((28, 28), 200, np.uint8))
    plain = dict(crop_pad=0, hflip=False, randaugment=RandAugmentConfig(enabled=False))
    off = train_transform(28, StudentConfig(**plain, erasing=0.0))
    assert torch.equal(off(img), torch.full((1, 28, 28), 200, dtype=torch.uint8))
    on = train_transform(28, StudentConfig(**plain, erasing=1.0))
    torch.manual_seed(0)
    for _ in range(20):
        x = on(img)
        assert x.dtype == torch.uint8
        zero = (x[0] == 0)
        rows, cols = zero.any(1).nonzero(), zero.any(0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert zero.sum() == box  # one solid rectangle
        assert 0.02 * 784 * 0.8 <= box <= 0.25 * 784 * 1.2  # 2-25 % of the image (integer sides)
    assert noise.describe(StudentConfig(erasing=0.5))["erasing"] == 0.5


def test_missing_model_dir_is_a_user_error(tmp_path):
    with pytest.raises(ConfigError, match="not a model directory"):
        models.load_model_dir(tmp_path)
    with pytest.raises(ConfigError, match="weights file not found"):
        models.create_model("resnet10t", 2, 1, pretrained=str(tmp_path / "w.safetensors"))


def test_constructor_args_travel_with_the_model_dir(tmp_path):
    """A thinner ResNet (timm's ``channels``) is rebuilt with its own shape from config.json."""
    import torch

    from pipeline.modeling import models

    m = models.create_model("resnet10t", 10, 1, channels=(16, 32, 64, 96)).eval()
    models.save_model_dir(m, tmp_path, [str(i) for i in range(10)], [0.5], [0.25], 28, 1)
    back, _ = models.load_model_dir(tmp_path)
    assert models.num_params(back) == models.num_params(m) < models.num_params(models.create_model("resnet10t", 10, 1))
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_grown_student_starts_as_its_teacher():
    """resnet10t weights in a resnet18t (timm's resnet10t with more blocks): the same function."""
    from pipeline.modeling.models import create_model, grow_from

    torch.manual_seed(0)
    teacher = create_model("resnet10t", 4, 1)
    with torch.no_grad():  # a trained-looking teacher: non-zero last BatchNorms everywhere
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.running_mean.uniform_(-0.1, 0.1)
    student = create_model("resnet18t", 4, 1, drop_path_rate=0.1)
    assert grow_from(student, teacher.state_dict()) > 0  # the extra blocks
    x = torch.randn(3, 1, 28, 28)
    teacher.eval(), student.eval()
    assert torch.allclose(teacher(x), student(x), atol=1e-5)
    assert sum(p.numel() for p in student.parameters()) > 2 * sum(
        p.numel() for p in teacher.parameters())
    with pytest.raises(ConfigError, match="does not contain the teacher's layers"):
        grow_from(create_model("resnet18", 4, 1), teacher.state_dict())


def test_cnn32_rebuilds_and_grows_deeper(tmp_path):
    """The 32 px backbone: registered with timm, rebuilt from its model directory, and a deeper
    one (``depth``) grown from it computes the same function before training."""
    from pipeline.modeling.models import create_model, grow_from, load_model_dir, save_model_dir

    torch.manual_seed(0)
    small = create_model("noisy_student_cnn32_s", 10, 3, drop_rate=0.1, drop_path_rate=0.1)
    with torch.no_grad():
        for m in small.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
    x = torch.randn(2, 3, 32, 32)
    small.eval()
    assert small(x).shape == (2, 10) and small.forward_features(x).shape[-1] == 3  # 31 -> 15 -> 7 -> 3
    deeper = create_model("noisy_student_cnn32_s", 10, 3, depth=3).eval()
    assert grow_from(deeper, small.state_dict()) > 0
    assert torch.allclose(deeper(x), small(x), atol=1e-5)
    save_model_dir(deeper, tmp_path, [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3, 32, 3)
    back, cfg = load_model_dir(tmp_path)
    assert cfg["architecture"] == "noisy_student_cnn32_s" and models.num_params(back) == models.num_params(deeper)
    with torch.no_grad():
        assert torch.equal(back(x), deeper(x))
    assert models.num_params(create_model("noisy_student_cnn32_m", 10, 3)) > 2 * models.num_params(small)
    thin = create_model("noisy_student_cnn32_s", 10, 3, channels=(16, 64, 64))  # distill.channels: the group widths
    assert [g[0].out_channels for g in thin.groups] == [16, 64, 64]
    with pytest.raises(ConfigError, match="does not accept"):  # an unknown option is an error, not ignored
        create_model("noisy_student_cnn32_s", 10, 3, widht=(16, 64, 64))
    named = create_model("noisy_student_cnn32_s3", 10, 3)  # the registered deeper student: the same shapes as depth=3
    assert {k: v.shape for k, v in named.state_dict().items()} == {k: v.shape for k, v in deeper.state_dict().items()}


def _timm_only(directory, x_path) -> dict:
    """Load ``directory`` in a fresh process that imports timm and nothing of ours; its logits on ``x``."""
    import subprocess
    import sys

    code = ("import json, sys, timm, torch\nfrom safetensors.torch import load_file\n"
            f"m = timm.create_model('local-dir:{directory}', pretrained=True).eval()\n"
            f"x = load_file('{x_path}')['x']\n"
            "print(json.dumps({'ours': sorted(k for k in sys.modules if k.split('.')[0] == 'pipeline'), "
            "'logits': m(x).tolist()}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/")
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_model_directories_of_timm_architectures_load_with_timm_alone(tmp_path):
    """resnet18t is ours by name only: it is saved as timm's resnet10t plus ``layers``; the config
    keeps no ImageNet tag, licence or origin; the licence is the config's."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = models.create_model("resnet18t", 4, 1, drop_rate=0.2).eval()
    models.save_model_dir(model, tmp_path / "m", ["a", "b", "c", "d"], [0.5], [0.25], 16, 1, license="cc-by-4.0")
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["architecture"] == "resnet10t" and conf["model_args"]["layers"] == [2, 2, 2, 2]
    pc = conf["pretrained_cfg"]
    assert not {"tag", "origin_url", "hf_hub_id", "paper_ids"} & set(pc) and pc["license"] == "cc-by-4.0"
    assert "source" not in conf
    x = torch.randn(2, 1, 16, 16)
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    got = _timm_only(tmp_path / "m", tmp_path / "x.safetensors")
    assert got["ours"] == []
    with torch.no_grad():
        assert torch.allclose(torch.tensor(got["logits"]), model(x), atol=1e-5)


def test_our_own_architecture_names_its_origin_and_a_removed_name_is_refused_in_one_line(tmp_path):
    import pipeline

    model = models.create_model("noisy_student_cnn32_s", 10, 3).eval()
    models.save_model_dir(model, tmp_path / "m", [str(i) for i in range(10)], [0.5] * 3, [0.25] * 3, 32, 3)
    conf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert conf["source"] == {"package": "noisy-student", "version": pipeline.__version__,
                              "module": "pipeline.modeling.archs"}
    back, _ = models.load_model_dir(tmp_path / "m")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
    conf["architecture"] = "cnn32_s"  # as an earlier version wrote it: no shims before a release
    (tmp_path / "m" / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ConfigError, match="unknown architecture 'cnn32_s'"):
        models.load_model_dir(tmp_path / "m")
