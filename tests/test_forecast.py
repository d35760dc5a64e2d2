"""accel_core forecasting and the error-aware schedule, on their own."""
import math

import pytest
import torch

from dit_token_cache.accel_core.cache_store import CacheStore
from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.forecast import FeatureHistory
from dit_token_cache.accel_core.run import CacheRun
from dit_token_cache.accel_core.schedule import CacheSchedule, StepKind

F, A, C = StepKind.FULL, StepKind.AGGRESSIVE, StepKind.CONSERVATIVE
SIGMAS = [1.0 - i / 10 for i in range(11)]
BASE = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0))
SLOPE = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
CURVE = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(2))


def linear(t):
    return BASE + t * SLOPE


def quadratic(t):
    return BASE + t * SLOPE + t * t * CURVE


def history(feature, times, depth, max_span=math.inf):
    h = FeatureHistory(depth, max_span)
    for t in times:
        h.put(feature(t), t)
    return h


@pytest.mark.parametrize("order,feature,times,at", [(1, linear, [0.93, 0.71], (0.6, 0.5, 0.71)),
                                                    (2, quadratic, [0.93, 0.71, 0.42], (0.3, 0.17, 0.42))])
def test_extrapolation_is_exact_on_polynomials_of_its_order_with_uneven_spacing(order, feature, times, at):
    h = history(feature, times, order + 1)                      # uneven gaps, as a karras schedule has
    for t in at:
        torch.testing.assert_close(h.estimate(t), feature(t), rtol=1e-5, atol=1e-5)


def test_order_one_misses_curvature_that_order_two_captures():
    error_1 = (history(quadratic, [0.9, 0.6, 0.45], 2).estimate(0.32) - quadratic(0.32)).norm()
    error_2 = (history(quadratic, [0.9, 0.6, 0.45], 3).estimate(0.32) - quadratic(0.32)).norm()
    assert error_2 < 1e-4 < error_1


def test_reuse_returns_the_newest_values_untouched():
    h = history(linear, [0.9, 0.5], 1)
    assert h.estimate(0.1) is h.newest
    assert torch.equal(h.newest, linear(0.5)) and len(h.terms) == 1


def test_guard_falls_back_to_a_lower_order_when_full_steps_are_far_apart():
    h = history(quadratic, [0.95, 0.9, 0.4], 3, max_span=0.3)
    assert h.order() == 0 and h.order(math.inf) == 2          # 0.9 -> 0.4 is too wide even for a line
    assert torch.equal(h.estimate(0.3), quadratic(0.4))
    h = history(quadratic, [0.95, 0.5, 0.4], 3, max_span=0.3)
    assert h.order() == 1                                      # the line through 0.5 and 0.4 is allowed
    expected = quadratic(0.4) + (0.3 - 0.4) * (quadratic(0.4) - quadratic(0.5)) / (0.4 - 0.5)
    torch.testing.assert_close(h.estimate(0.3), expected)


def test_the_same_time_twice_starts_the_trend_again():
    h = history(linear, [0.7, 0.5, 0.5], 2)
    assert h.order() == 0
    assert torch.equal(h.estimate(0.2), linear(0.5))


def test_refreshed_tokens_carry_the_trend_of_the_full_steps_from_their_own_value():
    h = history(linear, [0.9, 0.6], 2)
    index = torch.tensor([1, 3])
    offset = 0.25
    h.refresh(index, linear(0.5)[:, index] + offset, 0.5)      # a conservative step at 0.5, off the line by 0.25
    expected = linear(0.35)
    expected[:, index] += offset
    torch.testing.assert_close(h.estimate(0.35), expected)
    # the tokens computed now come back as computed
    torch.testing.assert_close(h.estimate(0.5)[:, index], linear(0.5)[:, index] + offset, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h.estimate(0.35, index=torch.tensor([0, 3])), expected[:, [0, 3]])
    assert len(h.terms) == 2                             # no copy beyond the trend's
    h.refresh(None, linear(0.4), 0.4)                          # every token, e.g. a conservative step's final state
    torch.testing.assert_close(h.estimate(0.32), linear(0.32))


def test_store_counts_every_kept_copy_and_estimates_per_cond():
    store = CacheStore(depth=2)
    store.put_feature(["c", "u"], "mlp", linear(0.9), 0.9)
    assert store.nbytes == BASE.numel() * 4
    store.put_feature(["c", "u"], "mlp", linear(0.6), 0.6)
    store.put_feature(["c", "u"], "mlp", linear(0.4), 0.4)      # depth 2: value and one difference
    assert store.nbytes == store.peak_bytes == 2 * BASE.numel() * 4
    torch.testing.assert_close(store.estimate(["u"], "mlp", torch.device("cpu"), 0.25), linear(0.25)[1:])
    store.scatter(["c", "u"], "mlp", torch.tensor([0]), linear(0.3)[:, :1] + 1, time=0.3)
    assert store.nbytes == 2 * BASE.numel() * 4
    expected = linear(0.25)
    expected[:, 0] += 1
    torch.testing.assert_close(store.estimate(["c", "u"], "mlp", torch.device("cpu"), 0.25), expected)
    store.put_feature(["c", "u"], "mlp", linear(0.3), 0.3, exact=False)   # a conservative step's whole output
    torch.testing.assert_close(store.estimate(["c", "u"], "mlp", torch.device("cpu"), 0.25), linear(0.25))
    assert not store.order_lowered("c", "mlp")


def test_forecast_settings_are_validated():
    with pytest.raises(ValueError, match="forecast='cubic': accepted reuse, linear, quadratic"):
        CacheConfig(forecast="cubic")
    with pytest.raises(ValueError, match="max_error=-1: accepted a number >= 0"):
        CacheConfig(max_error=-1)
    with pytest.raises(ValueError, match="only modes duca and toca have"):
        CacheConfig(max_error=0.1, mode="fora")
    with pytest.raises(ValueError, match="forecast_max_span=0"):
        CacheConfig(forecast_max_span=0)


# -- error-aware schedule -------------------------------------------------------------

def test_schedule_forces_and_postpones_full_steps():
    schedule = CacheSchedule(CacheConfig(cycle_length=3, mode="toca", max_error=0.1), SIGMAS, 1.0, 0.0)
    assert schedule.kinds == [F, C, C, F, C, C, F, C, C, F]
    assert schedule.force_full(2) and schedule.kinds == [F, C, F, C, C, F, C, C, F, C]
    assert not schedule.force_full(5)                          # already full
    assert schedule.postpone_full(5) and schedule.kinds == [F, C, F, C, C, C, F, C, C, F]
    assert schedule.postpone_full(6) and schedule.kinds[:8] == [F, C, F, C, C, C, C, F]
    assert schedule.postpone_full(7) and schedule.kinds[:9] == [F, C, F, C, C, C, C, C, F]
    assert not schedule.postpone_full(8)                        # the cycle is 2 x cycle_length long


def test_schedule_keeps_the_window():
    schedule = CacheSchedule(CacheConfig(cycle_length=3, max_error=0.1), SIGMAS, 0.75, 0.25)
    assert schedule.kinds == [F, F, F, F, A, C, F, A, F, F]
    assert not schedule.postpone_full(3)                       # the window's first step
    assert not schedule.postpone_full(8)                       # outside the window
    assert schedule.cache_needed_after(2) is False and schedule.cache_needed_after(6) is True


def _step(run, sigma, uuids, fresh_errors):
    """One evaluation of a one-block model: the block's MLP output is cached at
    full steps; at conservative steps token 0 is recomputed with a fresh value
    off its cached one by the relative error given for each cond."""
    plan = run.begin_forward(sigma, uuids, ("sig",))
    rows = len(uuids)
    if plan.kind is F:
        run.put_feature(0, "mlp", torch.ones(rows, 4, 2))
    elif plan.kind is C:
        cached = run.get(0, "mlp", torch.device("cpu"))[:, :1]
        scale = torch.tensor([1.0 / (1.0 - e) for e in fresh_errors]).reshape(rows, 1, 1)
        run.scatter_feature(0, "mlp", torch.tensor([0]), cached * scale)
    run.put_final(torch.ones(rows, 4, 2))
    run.end_forward()
    return plan.kind


def test_a_large_measured_error_forces_the_next_step_full():
    run = CacheRun(CacheConfig(cycle_length=5, mode="toca", max_error=0.1), SIGMAS, 1.0, 0.0)
    errors = {1: 0.01, 2: 0.5, 4: 0.06}
    kinds = [_step(run, SIGMAS[i], ["c"], [errors.get(i, 0.01)]) for i in range(10)]
    assert kinds[:5] == [F, C, C, F, C]                         # step 2 measured 0.5 > 0.1
    assert run.stats.full_steps_added == 1
    assert run.stats.step_errors[2] == pytest.approx(0.5, rel=1e-4)


def test_a_small_measured_error_stretches_the_cycle_and_reports_it():
    run = CacheRun(CacheConfig(cycle_length=3, mode="toca", max_error=0.1), SIGMAS, 1.0, 0.0)
    kinds = [_step(run, SIGMAS[i], ["c"], [0.01]) for i in range(10)]
    assert kinds == [F, C, C, C, C, C, F, C, C, C]             # at most 2 x cycle_length between full steps
    assert run.stats.full_steps_saved == 4
    assert "measured error mean 0.010 max 0.010, full steps +0/-4 by error" in run.stats.summary("DuCa")


def test_without_max_error_nothing_changes_the_cycles():
    run = CacheRun(CacheConfig(cycle_length=3, mode="toca"), SIGMAS, 1.0, 0.0)
    kinds = [_step(run, SIGMAS[i], ["c"], [0.9]) for i in range(10)]
    assert kinds == [F, C, C, F, C, C, F, C, C, F]
    assert run.stats.step_errors[1] == pytest.approx(0.9, rel=1e-4)   # measured all the same


def test_only_the_first_cond_of_a_step_measures_so_split_and_batched_cfg_decide_alike():
    def schedule(split):
        run = CacheRun(CacheConfig(cycle_length=5, mode="toca", max_error=0.1), SIGMAS, 1.0, 0.0)
        kinds = []
        for i in range(10):
            first = 0.5 if i == 2 else 0.01
            if split:   # the first cond is fine but at step 2, the second far off: only the first counts
                kinds.append(_step(run, SIGMAS[i], ["c"], [first]))
                _step(run, SIGMAS[i], ["u"], [0.9])
            else:
                kinds.append(_step(run, SIGMAS[i], ["c", "u"], [first, 0.9]))
        return kinds, run.stats.step_errors
    split, batched = schedule(True), schedule(False)
    assert split[0] == batched[0] and split[1] == pytest.approx(batched[1])
    assert split[0][:4] == [F, C, C, F]
    assert batched[1][1] == pytest.approx(0.01, rel=1e-4)   # the second cond (0.9 off) is not counted


def test_the_trend_is_held_beyond_one_full_step_spacing():
    h = history(linear, [0.9, 0.8], 2)                          # full steps 0.1 apart
    torch.testing.assert_close(h.estimate(0.75), linear(0.75))
    torch.testing.assert_close(h.estimate(0.3), linear(0.7))    # followed to 0.7, then held
    h.refresh(torch.tensor([2]), linear(0.75)[:, [2]], 0.75)
    torch.testing.assert_close(h.estimate(0.3)[:, 2], linear(0.75)[:, 2] + (linear(0.7) - linear(0.75))[:, 2])
