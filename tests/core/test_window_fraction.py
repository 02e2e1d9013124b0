"""Windows as fractions of the schedule: a concept with window_unit "fraction" acts at step i of an
N-step schedule exactly when warmup <= i / N < cooldown, once its plan is turned into steps for the
run (Plan.for_steps); windows in steps are left as they are."""
from __future__ import annotations

import math
import random

import pytest

from sega_core import Concept, Plan, SEGAValueError
from sega_core.concepts import step_window

# fractions at and around the edges of many schedules (0.1 * 10 and 0.3 * 10 round away from i / N)
FRACTIONS = [0.0, 0.05, 0.1, 0.2, 0.25, 0.3, 1 / 3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.999, 1.0]
STEP_COUNTS = list(range(1, 41)) + [50, 100, 1000]


def _windows():
    rng = random.Random(0)
    pairs = [(a, b) for a in FRACTIONS for b in FRACTIONS + [None]]
    pairs += [(rng.random(), rng.choice([None, rng.random()])) for _ in range(200)]
    return pairs


def test_fraction_windows_act_where_the_definition_says():
    checked = acting = 0
    for start, end in _windows():
        plan = Plan.build([Concept(warmup=start, cooldown=end, window_unit="fraction")])
        for steps in STEP_COUNTS:
            resolved = plan.for_steps(steps)
            for i in range(steps):
                want = start <= i / steps and (end is None or i / steps < end)
                assert resolved.acts(i) == [want], (start, end, steps, i)
                acting += want
                checked += 1
    assert 0 < acting < checked


def test_step_window_edges():
    # an end of 1 (or none) reaches the last step; a start of 1 never acts
    for steps in STEP_COUNTS:
        assert step_window(0.0, 1.0, steps) == (0, steps)
        assert step_window(0.0, None, steps) == (0, math.inf)
        assert step_window(1.0, None, steps)[0] == steps


def test_the_same_window_in_steps_and_in_fractions():
    """@10-40 of a 50-step run is @0.2-0.8: the two plans act on the same steps."""
    steps = 50
    in_steps = Plan.build([Concept(warmup=10, cooldown=40)])
    fractions = Plan.build([Concept(warmup=0.2, cooldown=0.8, window_unit="fraction")]).for_steps(steps)
    assert fractions.warmup == in_steps.warmup and fractions.cooldown == in_steps.cooldown
    assert fractions == in_steps


def test_a_plan_in_steps_is_its_own_resolution():
    plan = Plan.build([Concept(warmup=3, cooldown=7), Concept()])
    assert plan.window_unit == ()
    assert plan.for_steps(20) is plan


def test_mixed_units_resolve_only_the_fractions():
    plan = Plan.build([Concept(warmup=3, cooldown=7), Concept(warmup=0.5, window_unit="fraction")])
    assert plan.window_unit == ("steps", "fraction")
    resolved = plan.for_steps(20)
    assert resolved.warmup == (3, 10) and resolved.cooldown == (7, math.inf) and resolved.window_unit == ()


def test_an_unresolved_plan_refuses_step_questions():
    plan = Plan.build([Concept(warmup=0.5, window_unit="fraction")])
    for ask in (plan.rows, plan.acts, plan.warmed):
        with pytest.raises(SEGAValueError, match=r"Plan.for_steps"):
            ask(0)


@pytest.mark.parametrize("settings,message", [
    (dict(warmup=1.5), r"warmup must be a fraction of the schedule in \[0, 1\]"),
    (dict(warmup=-0.1), r"warmup must be a fraction of the schedule in \[0, 1\]"),
    (dict(warmup=float("nan")), r"warmup must be a fraction of the schedule in \[0, 1\]"),
    (dict(warmup=0.1, cooldown=2.0), r"cooldown must be a fraction of the schedule in \[0, 1\]"),
])
def test_fraction_limits(settings, message):
    with pytest.raises(SEGAValueError, match=r"SEGA: 'x': " + message):
        Plan.build([Concept(window_unit="fraction", **settings)], names=["'x'"])


def test_unknown_unit():
    with pytest.raises(SEGAValueError, match=r"window_unit must be one of steps, fraction, got 'percent'"):
        Concept(window_unit="percent").validate()
