"""The families cached through their blocks' own submodules (Wan, Qwen-Image,
PixArt, LTX-Video, Lumina 2, HiDream): each loads from a tiny checkpoint in its
own format through ComfyUI's detection, is exact where nothing is cached, does
the expected work, matches an independent reference at a conservative step,
and gives the same result with CFG batched and split."""
import pytest
import torch

import tiny_models

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.schedule import StepKind
from dit_token_cache.nodes.adapters.modulewise import REUSE, ModulewiseAdapter
from dit_token_cache.nodes.families import adapter_for
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

# family -> sampling arguments small enough for 2 CPU cores
CASES = {
    "wan_t2v": dict(width=32, height=32, frames=5),
    "wan_i2v": dict(width=32, height=32, frames=5),        # frames: those of its image conditioning
    "wan22_ti2v": dict(width=64, height=64, frames=9),     # start frame at timestep 0: per-token modulation
    "sd3": dict(width=128, height=128),                    # last block's text half pre-only
    "sd35_medium": dict(width=128, height=128),            # second image-only attention in every block
    # width fixed at 1152 by detection: few tokens (1 x 32); a latent side sum under 66 makes
    # PixArtMS's position embedding NaN
    "pixart_sigma": dict(width=512, height=16),
    "pixart_alpha": dict(width=512, height=16),            # size micro-conditioning
    "ltxv": dict(width=256, height=256, frames=9),         # text attention mask with padding
    # widths fixed by detection (3072, 2304): few tokens
    "qwen_image": dict(width=32, height=32),               # joint attention, image and text MLPs
    "lumina2": dict(width=32, height=32),                  # one stream of text and image tokens
    "hidream": dict(width=64, height=64),                  # MoE image FFN; double and single blocks
}
STEPS = 6


@pytest.fixture(scope="module", params=sorted(CASES))
def family_model(request, tiny_model):
    return request.param, tiny_model(request.param)


def _sample(family, model, **kw):
    return tiny_models.sample(model, family, steps=STEPS, seed=11, **{**CASES[family], **kw})


def _last_run(model):
    return model.model_options["transformer_options"][SETTINGS_KEY].last_run


def test_family_is_detected_and_exact_at_cycle_one(family_model):
    family, model = family_model
    assert isinstance(adapter_for(model), ModulewiseAdapter)
    base = _sample(family, model)
    assert torch.equal(_sample(family, apply_token_cache(model, CacheConfig(cycle_length=1))), base)
    # a window that holds no step computes everything too
    outside = apply_token_cache(model, CacheConfig(cycle_length=3, start_percent=0.99, end_percent=1.0))
    assert torch.equal(_sample(family, outside), base)
    assert torch.equal(_sample(family, model), base)   # the unpatched model is left as it was


def _sample_counting_tokens(family, model, adapter):
    """An uncached sample, and the tokens each block's stream-0 submodules see
    (block groups may differ: HiDream's single-stream blocks add the text)."""
    tokens, handles = {}, []
    for block_id, (_, block, group) in enumerate(adapter.blocks):
        spec = next(m for m in group.modules if m.stream == 0)

        def count(module, args, kwargs, block_id=block_id, spec=spec):
            tokens[block_id] = (kwargs[spec.input_name] if spec.input_name else args[0]).shape[1]
        handles.append(block.get_submodule(spec.path).register_forward_pre_hook(count, with_kwargs=True))
    try:
        return _sample(family, model), tokens
    finally:
        for handle in handles:
            handle.remove()


def test_duca_work_matches_the_schedule_and_output_stays_close(family_model):
    family, model = family_model
    adapter = adapter_for(model)
    base, tokens = _sample_counting_tokens(family, model, adapter)
    config = CacheConfig(cycle_length=3, cache_ratio=0.75)
    patched = apply_token_cache(model, config)
    out = _sample(family, patched)
    stats = _last_run(patched).stats
    assert stats.counts() == {"full": 2, "aggressive": 2, "conservative": 2} and not stats.notes
    # per block: every stream-0 submodule computes all its T tokens at a full step; at a
    # conservative step the token-wise ones compute the selected ones, attention none
    full = conservative = 0
    for block_id, (_, _, group) in enumerate(adapter.blocks):
        main = [m for m in group.modules if m.stream == 0]
        full += len(main) * tokens[block_id]
        conservative += sum(m.role != REUSE for m in main) * config.recompute_count(tokens[block_id])
    assert stats.token_blocks_total == STEPS * 2 * full   # 2 rows: cond, uncond
    assert stats.token_fraction == pytest.approx((2 * full + 2 * conservative) / (STEPS * full))
    # full steps do all the work, conservative ones under 1 - r of it (the token-wise share for
    # the selected tokens). The work is also under the token share only where attention
    # outweighs the rest: in PixArt's and LTX-Video's blocks, with more tokens than the width.
    assert 2 / STEPS < stats.work_fraction < (2 + 2 * (1 - config.cache_ratio)) / STEPS
    relative_l2 = float((out - base).norm() / base.norm())
    print(f"{family}: DuCa N=3 r=0.75 work {stats.work_fraction:.3f}, relative L2 vs uncached {relative_l2:.4f}")
    assert torch.isfinite(out).all() and 0.0 < relative_l2 < 0.5
    assert torch.equal(out, _sample(family, apply_token_cache(model, config)))   # deterministic


def test_conservative_step_matches_an_independent_reference(family_model):
    """Forward hooks on the family's own submodules see what each one returned:
    at the first conservative step after a full step, attention returns the
    full step's output, token-wise modules return the full step's rows except
    for the selected tokens, which equal the module's own forward on its whole
    current input."""
    family, model = family_model
    patched = apply_token_cache(model, CacheConfig(mode="toca", cycle_length=3, cache_ratio=0.75))
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    adapter = adapter_for(model)
    full_outputs, checked = {}, []

    def hook(block_id, spec, module, args, kwargs, output):
        run = settings.active_run
        if run is None or run.plan is None:
            return
        name = (block_id, spec.path)
        if run.plan.kind is StepKind.FULL:
            full_outputs[name] = [o.clone() for o in (output if isinstance(output, tuple) else (output,))]
            return
        if name not in full_outputs:
            return
        full = full_outputs.pop(name)   # only the first conservative step after the full step
        if spec.role == REUSE:
            for got, expected in zip(output if isinstance(output, tuple) else (output,), full):
                assert torch.equal(got, expected)
        else:
            index = run.last_selection[block_id if spec.stream == 0 else (block_id, spec.stream)]
            kept = torch.ones(output.shape[1], dtype=torch.bool)
            kept[index] = False
            assert 0 < index.numel() < output.shape[1]
            assert torch.equal(output[:, kept], full[0][:, kept])
            own = type(module).forward(module, *args, **kwargs)
            # a float32 matmul over fewer rows sums in another order: up to 3e-5 apart on
            # outputs of order 1 through PixArt's 4608-wide MLP
            torch.testing.assert_close(output[:, index], own[:, index], rtol=1e-4, atol=1e-4)
        checked.append(name)

    handles = []
    for block_id, (_, block, group) in enumerate(adapter.blocks):
        for spec in group.modules:
            module = block.get_submodule(spec.path)
            handles.append(module.register_forward_hook(
                lambda m, a, k, o, block_id=block_id, spec=spec: hook(block_id, spec, m, a, k, o), with_kwargs=True))
    try:
        _sample(family, patched)
    finally:
        for handle in handles:
            handle.remove()
    assert len(checked) == sum(len(group.modules) for _, _, group in adapter.blocks) * 2   # two cycles


def test_cfg_batched_and_split_give_the_same_result(family_model):
    family, model = family_model
    patched = apply_token_cache(model, CacheConfig(cycle_length=3, cache_ratio=0.75))
    batched = _sample(family, patched)
    batched_stats = _last_run(patched).stats
    usual = patched.model.memory_usage_factor
    patched.model.memory_usage_factor = 1e15      # nothing fits: ComfyUI runs cond and uncond one at a time
    try:
        split = _sample(family, patched)
    finally:
        patched.model.memory_usage_factor = usual
    split_stats = _last_run(patched).stats
    assert split_stats.evaluations == 2 * batched_stats.evaluations
    assert split_stats.counts() == batched_stats.counts()
    # float32 rounds a batch of two and two batches of one differently, relative to the output's
    # scale: the tiny PixArt's latents reach 6000, uncached split and batched 0.006 apart
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4 * max(1.0, float(batched.abs().max())))


def test_selectors_available_and_refused(family_model):
    family, model = family_model
    out = _sample(family, apply_token_cache(model, CacheConfig(cycle_length=3, selector="similarity")))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="selector='v_norm' is not available.*accepted: random, similarity"):
        apply_token_cache(model, CacheConfig(selector="v_norm"))


def test_forecasting_extrapolates_on_every_family(family_model):
    """Linear forecasts through each family's own submodules: exact where
    nothing is cached, and where full steps give a trend (every other step
    here), the estimates differ from reuse and stay close to the uncached run."""
    family, model = family_model
    base = _sample(family, model)
    assert torch.equal(_sample(family, apply_token_cache(model, CacheConfig(cycle_length=1, forecast="linear"))), base)
    settings = dict(cycle_length=2, mode="toca", cache_ratio=0.75, forecast_max_span=1.0)
    reuse = _sample(family, apply_token_cache(model, CacheConfig(**settings)))
    patched = apply_token_cache(model, CacheConfig(**settings, forecast="linear"))
    linear = _sample(family, patched)
    stats = _last_run(patched).stats
    assert not stats.notes and stats.step_errors
    assert not torch.equal(linear, reuse) and torch.isfinite(linear).all()
    assert float((linear - base).norm() / base.norm()) < 0.5
    assert torch.equal(linear, _sample(family, apply_token_cache(model, CacheConfig(**settings, forecast="linear"))))
