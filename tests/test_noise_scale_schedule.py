"""When the variance probe measures: ``measure.points`` per trial (linear or log-spaced over
its iterations), the same number at every batch size, or ``measure.every`` iterations
instead (never both); the schedule is a pure function of the trial's total iterations, so a
resumed trial measures where an uninterrupted one does."""
from __future__ import annotations

import copy
import itertools
from pathlib import Path

import pytest
import torch

from study.data import DataSplit
from study.spec import SpecError, load_spec, parse_spec
from study.trial import run_trial
from study.variance import (
    DEFAULT_POINTS,
    ProbeSettings,
    VarianceProbe,
    log_spaced_iterations,
    measurement_iterations,
)

ROOT = Path(__file__).resolve().parents[1]
BASE = {"name": "sched", "dataset": {"name": "mnist1d", "size": 1000, "val_fraction": 0.1},
        "models": [{"name": "mlp", "widths": [16]}], "epochs": 2, "seeds": [0], "lr": [0.1],
        "batch_size": [32], "families": {"sgd": {"variants": ["momentum"]}}}


def spec_with(measure: dict | None):
    raw = copy.deepcopy(BASE)
    if measure is not None:
        raw["measure"] = measure
    return parse_spec(raw)


def problems(measure: dict) -> str:
    with pytest.raises(SpecError) as err:
        spec_with(measure)
    return str(err.value)


def due_iterations(settings: ProbeSettings, total: int, n: int = 400, batch_size: int = 4):
    data = DataSplit(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))
    probe = VarianceProbe(settings, data, batch_size, 0, total)
    return [i for i in range(total) if probe.due(i)]


def test_linear_points_are_evenly_spread_from_first_to_last_iteration():
    its = measurement_iterations(2240, 12)
    assert len(its) == 12 and its[0] == 0 and its[-1] == 2239
    gaps = [b - a for a, b in itertools.pairwise(its)]
    assert max(gaps) - min(gaps) <= 1                       # rounding only
    for k, it in enumerate(its):
        assert abs(it - k * 2239 / 11) <= 0.5
    # a batch-512 trial of the default study (140 iterations) and a batch-32 one (2,240):
    # measured at the same fractions of training
    assert measurement_iterations(140, 10) == [0, 15, 31, 46, 62, 77, 93, 108, 124, 139]
    assert measurement_iterations(2240, 10) == [0, 249, 498, 746, 995, 1244, 1493, 1741, 1990,
                                                2239]


def test_log_points_follow_the_histogram_schedule_and_start_shifts_both():
    assert measurement_iterations(896, 8, "log") == log_spaced_iterations(896, 8)
    assert measurement_iterations(100, 5, "linear", start=20) == [20, 40, 60, 79, 99]
    assert measurement_iterations(100, 3, "log", start=10) == [
        10 + i for i in log_spaced_iterations(90, 3)]
    assert measurement_iterations(100, 4, start=100) == []
    assert measurement_iterations(100, 0) == []
    assert measurement_iterations(1, 5) == [0]
    short = measurement_iterations(5, 12)                   # fewer iterations than points
    assert short == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("spacing", ["linear", "log"])
def test_every_batch_size_of_the_default_study_gets_the_same_measurements(spacing):
    spec = load_spec(ROOT / "search_spaces" / "default.yaml")
    settings = spec.measure.settings()
    assert settings.points and settings.every is None          # the default study uses points
    settings = ProbeSettings(points=settings.points, batches=settings.batches, spacing=spacing,
                             histograms=False)
    m = spec.dataset.train_size()
    counts = {}
    for bs in spec.batch_size:
        total = spec.epochs * (m // bs)
        due = due_iterations(settings, total, n=m, batch_size=bs)
        assert due == measurement_iterations(total, settings.points, spacing)
        counts[bs] = len(due)
    assert set(counts.values()) == {settings.points}, counts
    # the alternative, every 100 iterations, gives 23 / 6 / 2 measurements
    every = [len(due_iterations(ProbeSettings(every=100, histograms=False),
                                spec.epochs * (m // bs), n=m, batch_size=bs))
             for bs in spec.batch_size]
    assert every == [23, 6, 2]


def test_probe_schedule_is_a_pure_function_of_total_iterations():
    settings = ProbeSettings(points=7, spacing="log")
    first, again = due_iterations(settings, 300), due_iterations(settings, 300)
    assert first == again == measurement_iterations(300, 7, "log")
    assert len(first) == 7


def test_spec_points_every_and_spacing():
    default = spec_with(None).measure.settings()
    assert (default.points, default.every, default.spacing) == (DEFAULT_POINTS, None, "linear")
    assert spec_with({"points": 6, "spacing": "log"}).measure.settings().spacing == "log"
    every = spec_with({"every": 50}).measure.settings()
    assert (every.every, every.points) == (50, None)
    assert spec_with({"every": 0, "histograms": False}).measure.settings() is None
    assert spec_with({"points": 0, "histograms": False}).measure.settings() is None
    hist_only = spec_with({"points": 0}).measure.settings()
    assert hist_only is not None and not hist_only.measures


def test_spec_refuses_points_and_every_together_naming_the_field():
    message = problems({"points": 12, "every": 100})
    assert "measure.every" in message and "points" in message
    assert "every=100" in message and "points=12" in message
    assert "\n" not in message
    message = problems({"every": 100, "spacing": "log"})
    assert "measure.spacing" in message and "'log'" in message
    assert "measure.spacing" in problems({"spacing": "cubic"})
    assert "measure.points" in problems({"points": -3})
    with pytest.raises(ValueError, match="points"):
        ProbeSettings(points=3, every=10)
    with pytest.raises(ValueError, match="spacing"):
        ProbeSettings(spacing="cubic")


def test_a_resumed_trial_measures_where_an_uninterrupted_one_does(tmp_path):
    raw = copy.deepcopy(BASE)
    raw["dataset"] = {"name": "mnist1d", "size": 600, "root": str(tmp_path)}
    raw["epochs"] = 4
    raw["measure"] = {"points": 5, "spacing": "log", "batches": 2, "histograms": False}
    spec = parse_spec(raw)
    config = spec.trial_config(spec.trials()[0])

    def run(**kwargs):
        logged, reports = [], []
        run_trial(config, log=lambda m, step: logged.append((step, dict(m))),
                  report=lambda m, s: reports.append(s), **kwargs)
        return [(step, m) for step, m in logged if "var/noise_scale" in m], reports

    full, _ = run()
    part, reports = run(stop_after=2)
    torch.save(reports[-1], tmp_path / "state.pt")
    rest, _ = run(state=torch.load(tmp_path / "state.pt", weights_only=False))
    total = 4 * (432 // 32)          # 600 examples: 480 train, 48 of them validation
    assert [step for step, _ in full] == measurement_iterations(total, 5, "log")
    assert part + rest == full        # the same iterations, the same values
