import pytest

from pipeline.cli import parse_args
from pipeline.config import ConfigError, load_config, parse_override, per_round


def test_defaults_and_name_from_stem(tmp_path):
    p = tmp_path / "my_exp.yaml"
    p.write_text("student:\n  threshold: 0.5\n")
    cfg = load_config(p)
    assert cfg.name == "my_exp"
    assert cfg.student.threshold == 0.5
    assert cfg.data.labeled_per_class == 100


def test_override_types_and_nesting(tmp_path):
    cfg = load_config(None, ["student.epochs=[3, 4]", "student.randaugment.m=12", "teacher.lr=1e-3",
                             "model.students=[resnet18, resnet26]", "data.max_test=null", "name=x"])
    assert cfg.student.epochs == [3, 4]
    assert cfg.student.randaugment.m == 12
    assert cfg.teacher.lr == pytest.approx(1e-3)
    assert cfg.model.students == ["resnet18", "resnet26"]
    assert per_round(cfg.student.epochs, 1) == 3 and per_round(cfg.student.epochs, 5) == 4


@pytest.mark.parametrize("override, fragment", [
    ("student.treshold=0.3", "unknown key 'student.treshold'"),
    ("bogus=1", "unknown key 'bogus'"),
    ("student.threshold=1.5", "student.threshold: must be <= 1"),
    ("student.threshold=-0.1", "student.threshold: must be >= 0"),
    ("teacher.lr=-1", "teacher.lr: must be > 0"),
    ("teacher.lr=0", "teacher.lr: must be > 0"),
    ("teacher.epochs=abc", "teacher.epochs: expected"),
    ("teacher.optimizer=adam", "teacher.optimizer: expected one of"),
    ("student.balance=3", "student.balance: expected bool"),
    ("data.labeled_per_class=0", "data.labeled_per_class: must be >= 1"),
    ("teacher.batch_size=2.5", "teacher.batch_size: expected int"),
    ("student=3", "student: expected a mapping"),
    ("novalue", "not of the form key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert fragment in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=true") == ("a", True)
    assert parse_override("a=null") == ("a", None)
    assert parse_override("a=some/path.tar") == ("a", "some/path.tar")


def test_stage_keys_are_separated_and_validated(tmp_path):
    from pipeline.cli import int_at_least

    cfg, stage = parse_args(["round=2", "student.drop_rate=0.2"], {"round": int_at_least(0)})
    assert stage == {"round": 2} and cfg.student.drop_rate == 0.2
    with pytest.raises(ConfigError, match="round: bad value"):
        parse_args(["round=-1"], {"round": int_at_least(0)})
    with pytest.raises(ConfigError, match="unknown key 'round'"):
        parse_args(["round=1"], {})


def test_per_round_noise_lists_resolve_per_round():
    from pipeline.config import for_round

    cfg = load_config(None, ["student.drop_rate=[0.3, 0.5]", "student.randaugment.m=[9, 15]",
                             "student.epochs=[2, 3]", "student.drop_path_rate=0.1"])
    r1, r2, r5 = (for_round(cfg.student, k) for k in (1, 2, 5))
    assert (r1.drop_rate, r1.randaugment.m, r1.epochs, r1.drop_path_rate) == (0.3, 9, 2, 0.1)
    assert (r2.drop_rate, r2.randaugment.m, r2.epochs) == (0.5, 15, 3)
    assert (r5.drop_rate, r5.randaugment.m, r5.epochs) == (0.5, 15, 3)
    with pytest.raises(ConfigError, match=r"student.drop_rate: must be <= 1"):
        load_config(None, ["student.drop_rate=[0.3, 1.5]"])
    with pytest.raises(ConfigError, match=r"student.randaugment.m: must be <= 30"):
        load_config(None, ["student.randaugment.m=[9, 31]"])


def test_shipped_configs_validate():
    from conftest import ROOT

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem


def test_finished_round_check_resolves_per_round_values():
    from pipeline.config import to_dict
    from pipeline.rounds import check_unchanged

    made = load_config(None, ["model.students=[resnet10t, resnet18]", "student.epochs=[3, 4]"])
    card = {"config": to_dict(made)}
    longer = load_config(None, ["model.students=[resnet10t, resnet18, resnet26]", "student.epochs=[3, 4, 5]",
                                "pseudo_label.workers=4"])
    for k in (0, 1, 2):
        check_unchanged(longer, k, card)  # extending the lists for round 3 changes nothing made
    changed = load_config(None, ["model.students=[resnet10t, resnet26]", "student.epochs=[3, 4]"])
    check_unchanged(changed, 1, card)
    with pytest.raises(ConfigError, match="round-2 .* arch='resnet18'"):
        check_unchanged(changed, 2, card)
    with pytest.raises(ConfigError, match="student.epochs=3"):
        check_unchanged(load_config(None, ["model.students=[resnet10t, resnet18]", "student.epochs=[2, 4]"]),
                        1, card)
    check_unchanged(load_config(None, ["student.threshold=0.9"]), 0, {"config": to_dict(load_config(None))})


def test_runtime_and_per_round_keys_come_from_field_metadata():
    """One place says what a key means for finished work: the config fields' metadata. Runtime keys
    leave the data's identity (its directory) and a finished distillation alone."""
    from pipeline.config import PER_ROUND_KEYS, RUNTIME_KEYS, DataConfig, flagged
    from pipeline.data.dataset import data_identity

    assert {"runs_dir", "budget", "teacher.workers", "student.compile", "pseudo_label.batch_size",
            "data.root", "distill.workers"} <= RUNTIME_KEYS
    assert not {"teacher.lr", "student.threshold", "pseudo_label.tta", "data.seed"} & RUNTIME_KEYS
    assert PER_ROUND_KEYS == {"student.epochs", "student.drop_rate", "student.drop_path_rate", "student.randaugment.m"}
    assert flagged(DataConfig, "runtime") == {"root", "download", "max_bad_share", "pool_check", "max_image_pixels",
                                                 "max_member_bytes"}
    assert data_identity(DataConfig(root="/a", download=False)) == data_identity(DataConfig(root="/b"))
    assert data_identity(DataConfig(seed=1)) != data_identity(DataConfig(seed=2))


def test_for_round_resolves_every_key_its_metadata_calls_per_round():
    import dataclasses

    from pipeline.config import StudentConfig, for_round

    def lists(section):  # every per-round key of the section (nested too) as a two-round list
        changes = {}
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            if dataclasses.is_dataclass(value):
                changes[f.name] = lists(value)
            elif f.metadata.get("per_round"):
                changes[f.name] = [value, value * 2]
        return dataclasses.replace(section, **changes)

    cfg = lists(StudentConfig())
    one, two = for_round(cfg, 1), for_round(cfg, 2)
    assert one.epochs * 2 == two.epochs and one.randaugment.m * 2 == two.randaugment.m
    assert (one.drop_rate * 2, one.drop_path_rate * 2) == (two.drop_rate, two.drop_path_rate)
    assert for_round(cfg, 5) == two  # the last value repeats
    assert cfg.lr == one.lr and isinstance(one.epochs, int)
