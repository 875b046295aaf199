"""The time budget: parsing, planning from given rates (nothing is timed), and a kept plan."""

import json

import pytest
import torch
from conftest import stage, tiny_overrides

from pipeline.config import ConfigError, load_config, parse_duration
from pipeline.training import budget
from pipeline.training.budget import START_SHARE, BudgetPlan, Phase, other_seconds, plan_epochs


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
    teacher = Phase(0, 80, 4000, label_images=41000, eval_images=10000)
    students = [Phase(1, 6, 54000, label_images=41000, eval_images=10000), Phase(2, 6, 54000, eval_images=10000)]
    phases = [teacher, *students]
    spent, plans = prepare_s, []
    for i, (phase, rate) in enumerate(zip(phases, rates, strict=True)):
        plan = plan_epochs(budget_s, spent, phase, phases[i + 1:], rate, teacher_share)
        plans.append(plan)
        spent += (plan["epochs"] * phase.images_per_epoch + phase.label_images * budget.INFERENCE_COST
                  + phase.eval_images * budget.EVAL_COST) / rate
    return plans, spent + START_SHARE * budget_s  # the start-up no phase clocks


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


def test_the_last_phase_keeps_what_the_last_round_measured_besides_training(tmp_path):
    """A round's probe, scoring and writes took more than an estimate from the training rate: the
    next plan reserves what the last finished round measured, with a margin for a slowing machine."""
    assert other_seconds(tmp_path, 2) is None
    (tmp_path / "round-1").mkdir()
    (tmp_path / "round-1" / "metrics.json").write_text(json.dumps(
        {"seconds": 1300.0, "train_seconds": 1220.0, "pseudo_label_seconds": 45.0}))
    measured = other_seconds(tmp_path, 2)
    assert measured == pytest.approx(35.0) and other_seconds(tmp_path, 1) is None
    last = Phase(2, 14, 54000, eval_images=30000)
    estimated = plan_epochs(3600, 1800, last, [], 1200.0)
    kept = plan_epochs(3600, 1800, last, [], 1200.0, other_s=measured)
    assert kept["reserved_s"] > START_SHARE * 3600 + measured > estimated["reserved_s"]
    assert kept["share_s"] + kept["reserved_s"] == pytest.approx(1800, abs=0.2) and kept["share_s"] < estimated["share_s"]
    # a resumed round reads low (its training seconds include the killed process's): never below the estimate
    assert plan_epochs(3600, 1800, last, [], 1200.0, other_s=0.0)["reserved_s"] == estimated["reserved_s"]


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
        cut = card["train"][0]["deadline_cut"]  # fewer epochs when the machine ran slower than planned
        assert card["train"][0]["epochs"] == (cut["epochs"] if cut else plan["phases"][str(k)]["epochs"]) >= 1
    assert not (exp / "round-0" / "state").exists()
    # round 1's plan keeps at least what round 0 took besides training (its probe, scoring, writes)
    took = other_seconds(exp, 1)
    assert took is not None and plan["phases"]["1"]["reserved_s"] >= round(budget.EVAL_MARGIN * took, 1)
    # a rerun does no work and keeps the plan; a different budget is refused
    r = stage("iterate.py", "round=1", "budget=8s", *ov)
    assert json.loads((exp / "budget.json").read_text()) == plan
    r = stage("iterate.py", "round=1", "budget=4s", *ov, check=False)
    assert r.returncode == 2 and "planned for 8 s" in r.stderr


def _tiny_run(tmp_path, epochs: int):
    from pipeline.config import TrainConfig
    from pipeline.data.dataset import Preprocessing
    from pipeline.tracking import Trackers
    from pipeline.training import trainer

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(4, 4))
    tcfg = TrainConfig(batch_size=8, optimizer="sgd", lr=0.1, warmup_epochs=0, mixed_precision="no", workers=0)
    job = trainer.Job(phase="train", cfg=tcfg, epochs=epochs, lr=0.1, labeled=None, labeled_total=32,
                      prep=Preprocessing.of("L", 16, [0.5], [0.5]))
    run = trainer._setup(net, job)
    run.trackers = Trackers([], tmp_path, "train", {}, True)
    return run


def test_a_phase_that_would_pass_its_deadline_keeps_fewer_epochs_and_still_anneals(tmp_path):
    """The budget's probe is short and a shared machine's throughput drifts: at each epoch's end a
    budgeted phase projects its end at the pace so far and, past its share, keeps fewer epochs
    with the cosine schedule re-fitted to end at zero with them (epoch seconds are given: nothing is timed)."""
    from pipeline.training import trainer

    state = tmp_path / "state"
    run = _tiny_run(tmp_path, epochs=10)
    spe = run.steps_per_epoch
    trainer._end_epoch(run, 0, torch.zeros(()), 5.0, tmp_path / "no-deadline", 0)
    assert run.job.epochs == 10 and run.cut is None  # no deadline: the plan stands
    run = _tiny_run(tmp_path, epochs=10)
    run.job.deadline_s = 25.0
    trainer._end_epoch(run, 0, torch.zeros(()), 5.0, state, 0)  # 5 s an epoch: 4 more fit in 25 s
    assert run.job.epochs == 5 and run.cut == {"after_epoch": 0, "planned_epochs": 10, "epochs": 5}
    factor = run.scheduler.lr_lambdas[0]
    assert factor(5 * spe) == 0 and factor(5 * spe - 1) > 0 and factor(spe) < 1
    trainer._end_epoch(run, 1, torch.zeros(()), 5.0, state, 0)  # on pace: no further cut
    assert run.job.epochs == 5
    # a resumed phase keeps the cut (its checkpoint has it), epochs and schedule alike
    again = _tiny_run(tmp_path, epochs=10)
    again.job.deadline_s = 25.0
    trainer._resume(again, state)
    assert again.start_epoch == 2 and again.job.epochs == 5 and again.cut == run.cut
    assert again.scheduler.lr_lambdas[0](5 * spe - 1) == factor(5 * spe - 1)
    # far past the deadline one epoch is still kept, so the rate decays to zero over it
    trainer._end_epoch(again, 2, torch.zeros(()), 30.0, state, 0)
    assert again.job.epochs == 4 and again.cut["planned_epochs"] == 10
    # never below the phase's floor (a budgeted teacher's fixed epochs)
    floor = _tiny_run(tmp_path, epochs=10)
    floor.job.deadline_s, floor.job.min_epochs = 25.0, 8
    trainer._end_epoch(floor, 0, torch.zeros(()), 5.0, tmp_path / "floor", 0)
    assert floor.job.epochs == 8 and floor.cut["epochs"] == 8
