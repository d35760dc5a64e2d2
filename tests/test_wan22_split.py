"""Wan 2.2 14B's two-model split: a high-noise model samples the first steps and a
low-noise model the rest, each through its own KSamplerAdvanced step range and its
own DuCa node. Each cache run must see only its own model's steps, cache nothing
across the switch, and, at cycle_length 1, change nothing at all."""
import pytest
import torch

import nodes
import tiny_models

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.schedule import StepKind
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

FAMILY = "wan_t2v"   # each model of the 14B pair has the 2.1 text-to-video layout
STEPS, SWITCH = 8, 3  # the high-noise model runs steps 0-2, the low-noise model steps 3-7
SIZE = dict(width=64, height=64, frames=9)
SEED = 11


@pytest.fixture(scope="module")
def pair(model_dir):
    """(high-noise, low-noise) tiny Wan models: same layout, other weights."""
    high = tiny_models.build_checkpoint(FAMILY, model_dir / f"{FAMILY}_tiny.safetensors", seed=0)
    low = tiny_models.build_checkpoint(FAMILY, model_dir / f"{FAMILY}_seed1_tiny.safetensors", seed=1)
    return tiny_models.load(FAMILY, high), tiny_models.load(FAMILY, low)


def _advanced(model, latent, add_noise, start, end, leftover_noise):
    """KSamplerAdvanced.sample, as nodes.py maps its widgets onto common_ksampler."""
    positive, negative = tiny_models.conditioning(FAMILY, model)
    (out,) = nodes.common_ksampler(model, SEED, STEPS, tiny_models.FAMILIES[FAMILY].default_cfg, "euler", "simple",
                                   positive, negative, latent, disable_noise=not add_noise, start_step=start,
                                   last_step=end, force_full_denoise=not leftover_noise)
    return out


def _two_stage(high, low):
    """The Wan 2.2 template: high noise adds noise and returns with leftover noise,
    low noise adds none and finishes the schedule. Returns (stage 1, stage 2) latents."""
    latent = tiny_models.empty_latent(FAMILY, SIZE["width"], SIZE["height"], frames=SIZE["frames"])
    first = _advanced(high, latent, add_noise=True, start=0, end=SWITCH, leftover_noise=True)
    second = _advanced(low, first, add_noise=False, start=SWITCH, end=10000, leftover_noise=False)
    return first["samples"], second["samples"]


def _settings(model):
    return model.model_options["transformer_options"][SETTINGS_KEY]


def _patched_pair(pair, config):
    high, low = pair
    return apply_token_cache(high, config, name="DuCa high"), apply_token_cache(low, config, name="DuCa low")


def test_cycle_one_on_both_models_is_exact(pair):
    _, base = _two_stage(*pair)
    _, out = _two_stage(*_patched_pair(pair, CacheConfig(cycle_length=1)))
    assert torch.equal(out, base)


def test_each_model_runs_its_own_steps_and_output_stays_close(pair):
    _, base = _two_stage(*pair)
    config = CacheConfig(cycle_length=3, cache_ratio=0.75)
    high, low = _patched_pair(pair, config)
    _, out = _two_stage(high, low)
    high_stats, low_stats = _settings(high).last_run.stats, _settings(low).last_run.stats
    # each run indexes its own sigmas: cycles restart at the switch
    assert high_stats.step_kinds == {0: StepKind.FULL, 1: StepKind.AGGRESSIVE, 2: StepKind.CONSERVATIVE}
    assert low_stats.counts() == {"full": 2, "aggressive": 2, "conservative": 1}
    assert len(low_stats.step_kinds) == STEPS - SWITCH
    # one batched cond+uncond evaluation per step of its own range, none of the other's
    assert (high_stats.evaluations, low_stats.evaluations) == (SWITCH, STEPS - SWITCH)
    assert not high_stats.notes and not low_stats.notes

    relative_l2 = float((out - base).norm() / base.norm())
    print(f"Wan 2.2 split, DuCa N=3 r=0.75 on both: work high {high_stats.work_fraction:.3f}, "
          f"low {low_stats.work_fraction:.3f}, relative L2 vs uncached {relative_l2:.4f}")
    assert torch.isfinite(out).all() and 0.0 < relative_l2 < 0.5
    _, again = _two_stage(*_patched_pair(pair, config))
    assert torch.equal(again, out)   # deterministic


def test_the_first_models_cache_never_reaches_the_second(pair):
    config = CacheConfig(cycle_length=3, cache_ratio=0.75)
    high, low = _patched_pair(pair, config)
    first, out = _two_stage(high, low)
    high_run, low_run = _settings(high).last_run, _settings(low).last_run
    assert high_run is not low_run
    assert high_run.store.uuids() == [] and high_run.store.nbytes == 0   # emptied when its sampling ended
    assert low_run.stats.step_kinds[0] is StepKind.FULL
    # stage 2 on the same latent with a DuCa node that never saw stage 1 gives the same result
    fresh_low = apply_token_cache(pair[1], config)
    alone = _advanced(fresh_low, {"samples": first}, add_noise=False, start=SWITCH, end=10000, leftover_noise=False)
    assert torch.equal(alone["samples"], out)


def test_one_model_in_both_stages_with_two_duca_nodes(pair):
    """Wan 2.1 users chain two KSamplerAdvanced on one model: two patched clones
    of the same diffusion model take turns, each with its own object patches."""
    model = pair[0]
    config = CacheConfig(cycle_length=3, cache_ratio=0.75)
    first, second = (apply_token_cache(model, config, name=name) for name in ("DuCa first", "DuCa second"))
    _, out = _two_stage(first, second)
    first_stats, second_stats = _settings(first).last_run.stats, _settings(second).last_run.stats
    assert first_stats.counts() == {"full": 1, "aggressive": 1, "conservative": 1}
    assert second_stats.counts() == {"full": 2, "aggressive": 2, "conservative": 1}
    assert 0.0 < first_stats.work_fraction < 1.0 and 0.0 < second_stats.work_fraction < 1.0
    _, exact = _two_stage(*(apply_token_cache(model, CacheConfig(cycle_length=1)) for _ in range(2)))
    _, base = _two_stage(model, model)
    assert torch.equal(exact, base)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
