"""The time budget: parsing, planning from given rates (nothing is timed), and a kept plan."""

import json

import pytest
from conftest import stage, tiny_overrides

from pipeline.config import ConfigError, load_config, parse_duration
from pipeline.training.budget import BudgetPlan, Phase, plan_epochs


def test_durations_parse_and_bad_ones_name_the_key():
    assert parse_duration("60m") == 3600 and parse_duration("1.5h") == 5400 and parse_duration(900) == 900
    assert parse_duration("45s") == 45 and parse_duration(" 2 m ") == 120
    for bad in ("soon", "-5m", "0", "nan", "inf", "5d", True):
        with pytest.raises(ConfigError, match="budget"):
            parse_duration(bad)
    assert load_config(None, ["budget=60m"]).budget == "60m"
    with pytest.raises(ConfigError, match="budget"):
        load_config(None, ["budget=an hour"])


def _run(budget_s: float, rates: list[float], prepare_s: float = 30.0,
         teacher_share: float | None = None) -> tuple[list[dict], float]:
    """Plan three phases one after another, each at its own measured rate, and 'run' each as planned."""
    teacher = Phase(0, 80, 4000, inference_images=51000)
    students = [Phase(1, 6, 54000, inference_images=51000), Phase(2, 6, 54000, inference_images=10000)]
    phases = [teacher, *students]
    spent, plans = prepare_s, []
    for i, (phase, rate) in enumerate(zip(phases, rates, strict=True)):
        plan = plan_epochs(budget_s, spent, phase, phases[i + 1:], rate, teacher_share)
        plans.append(plan)
        spent += plan["epochs"] * phase.images_per_epoch / rate + phase.inference_images * 0.35 / rate
    return plans, spent


@pytest.mark.parametrize("rate", [200.0, 800.0, 3000.0])
def test_a_plan_fits_the_budget_at_any_rate(rate):
    plans, spent = _run(3600, [rate] * 3)
    assert spent <= 3600
    # the whole budget is used, up to the rounding down of each phase to whole epochs
    assert spent > 3600 - sum(p.images_per_epoch for p in (Phase(0, 80, 4000), Phase(1, 6, 54000),
                                                             Phase(2, 6, 54000))) / rate
    # the fixed schedule's proportions are kept: the students get about equal shares
    assert abs(plans[1]["epochs"] - plans[2]["epochs"]) <= 1
    assert all(p["epochs"] >= 1 for p in plans)


def test_a_slow_phase_shortens_the_later_ones():
    even, _ = _run(3600, [800.0] * 3)
    slow_start, spent = _run(3600, [800.0, 400.0, 800.0])
    assert slow_start[0] == even[0] and slow_start[1]["epochs"] < even[1]["epochs"] and spent <= 3600
    assert slow_start[2]["epochs"] >= even[2]["epochs"] - 1


@pytest.mark.parametrize("teacher_share", [None, 0.05, 0.5])
@pytest.mark.parametrize("rate", [200.0, 800.0, 3000.0])
def test_the_teacher_keeps_its_fixed_epochs_whenever_the_budget_covers_them(rate, teacher_share):
    teacher_s = 80 * 4000 / rate  # the fixed schedule's 80 epochs at this (fake) rate
    for budget_s in (teacher_s * 2, teacher_s * 3, teacher_s * 20):
        plans, spent = _run(budget_s, [rate] * 3, prepare_s=0.0, teacher_share=teacher_share)
        assert plans[0]["epochs"] >= 80 and spent <= budget_s
    # a budget too short for them cuts the teacher, and the students still get an epoch each
    plans, _ = _run(teacher_s * 0.5, [rate] * 3, prepare_s=0.0, teacher_share=teacher_share)
    assert plans[0]["epochs"] < 80 and all(p["epochs"] >= 1 for p in plans[1:])


@pytest.mark.parametrize("share", [0.2, 0.5])
def test_a_teacher_share_gives_the_teacher_that_share_of_the_training_time(share):
    plans, spent = _run(3600, [800.0] * 3, teacher_share=share)
    trained = [p["planned_s"] for p in plans]
    assert trained[0] / sum(trained) == pytest.approx(share, abs=0.03)
    assert abs(plans[1]["epochs"] - plans[2]["epochs"]) <= 1 and spent <= 3600
    assert plans[0]["teacher_share"] == share
    # more share, more teacher epochs, fewer student ones
    other, _ = _run(3600, [800.0] * 3, teacher_share=share + 0.2)
    assert other[0]["epochs"] > plans[0]["epochs"] and other[1]["epochs"] < plans[1]["epochs"]
    with pytest.raises(ConfigError, match="budget_teacher_share"):
        load_config(None, ["budget_teacher_share=1.5"])


def test_an_exhausted_budget_still_trains_one_epoch():
    assert plan_epochs(60, 600, Phase(1, 6, 54000), [], 800.0)["epochs"] == 1


def test_a_recorded_plan_is_kept_and_another_budget_refused(tmp_path):
    plan = BudgetPlan(tmp_path, 3600)
    assert plan.get(1) is None
    plan.record(1, {"epochs": 17, "img_s": 812.0})
    again = BudgetPlan(tmp_path, 3600)
    assert again.get(1) == {"epochs": 17, "img_s": 812.0}
    with pytest.raises(ConfigError, match="planned for 3600 s"):
        BudgetPlan(tmp_path, 1800)


def test_budgeted_iterate_plans_records_and_resumes_with_its_plan(tiny_data, tmp_path):
    ov = tiny_overrides(tiny_data, tmp_path / "runs", name="budgeted")
    r = stage("iterate.py", "round=1", "budget=8s", *ov)
    assert "budget 8 s for rounds 0..1" in r.stdout + r.stderr and "budget: round 1 gets" in r.stdout + r.stderr
    exp = tmp_path / "runs" / "budgeted"
    plan = json.loads((exp / "budget.json").read_text())
    assert plan["budget_s"] == 8 and plan["last_round"] == 1 and set(plan["phases"]) == {"0", "1"}
    for k in (0, 1):
        card = json.loads((exp / f"round-{k}" / "card.json").read_text())
        assert card["budget"] == plan["phases"][str(k)]
        assert card["train"][0]["epochs"] == plan["phases"][str(k)]["epochs"] >= 1
    assert not (exp / "round-0" / "state").exists()
    # a rerun does no work and keeps the plan; a different budget is refused
    r = stage("iterate.py", "round=1", "budget=8s", *ov)
    assert json.loads((exp / "budget.json").read_text()) == plan
    r = stage("iterate.py", "round=1", "budget=4s", *ov, check=False)
    assert r.returncode == 2 and "planned for 8 s" in r.stderr
