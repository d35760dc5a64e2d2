"""Conds of different text lengths (issue 15): the positive and negative
prompts give cat(txt, img) layouts of different sizes. ComfyUI cannot batch
Flux-family conds of different lengths, so they run one at a time; conds of
one length batch when memory allows. Every evaluation must select tokens of
its own layout, and TokenCache's work must be what its ratio asks for on each."""
import pytest
import torch

import tiny_models
from flux_block_checks import duca, stats_of

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.tokencache import CachePredictor, FirstBlockPredictor
from dit_token_cache.nodes.families import adapter_for
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache
from dit_token_cache.nodes.tokencache_nodes import TokenCacheNode

FAMILY = "flux_dev"
STEPS = 12
RATIO = 0.9                          # TokenCache's default cache_ratio
WIDTH, HEIGHT = 160, 192             # latent 20 x 24: 120 image tokens
IMAGE_TOKENS = 120
POSITIVE_TOKENS, NEGATIVE_TOKENS = 16, 12


@pytest.fixture(scope="module")
def one_and_one(model_dir):
    """The issue's model: hidden 128, one double and one single block."""
    path = tiny_models.build_checkpoint(FAMILY, model_dir / f"{FAMILY}_1x1.safetensors", hidden_size=128, depth=1,
                                        depth_single_blocks=1)
    return tiny_models.load(FAMILY, path)


@pytest.fixture(scope="module")
def four_blocks(tiny_model):
    return tiny_model(FAMILY)        # two double and two single blocks


def _blocks(model):
    dm = model.model.diffusion_model
    return len(dm.double_blocks) + len(dm.single_blocks)


def _conditioning(model):
    return tiny_models.conditioning(FAMILY, model, tokens=POSITIVE_TOKENS, neg_tokens=NEGATIVE_TOKENS)


def _sample(patched, positive, negative):
    return tiny_models.sample(patched, FAMILY, steps=STEPS, cfg=2.0, seed=3, width=WIDTH, height=HEIGHT,
                              positive=positive, negative=negative)


def _last_run(patched):
    return patched.model_options["transformer_options"][SETTINGS_KEY].last_run


def _run(patched, positive, negative):
    out = _sample(patched, positive, negative)
    return out, _last_run(patched)


def _split(model, fn):
    """fn() with nothing fitting in memory: ComfyUI runs every cond on its own."""
    usual = model.model.memory_usage_factor
    model.model.memory_usage_factor = 1e15
    try:
        return fn()
    finally:
        model.model.memory_usage_factor = usual


def _token_fraction(run, layouts, blocks, protected, ratio=RATIO):
    """What TokenCache recomputes over the evaluations of one step, one per cond
    of `layouts` tokens each: all tokens at I-steps; at P-steps
    round((1 - r) * L * cacheable blocks) (block, token) pairs of the cond's own
    L tokens, and every token of the protected blocks."""
    counts = run.stats.counts()
    computed = total = 0
    for tokens in layouts:
        total += len(run.stats.step_kinds) * blocks * tokens
        computed += counts["full"] * blocks * tokens
        computed += counts["conservative"] * (round((1 - ratio) * tokens * (blocks - protected)) + protected * tokens)
    return computed / total


LAYOUTS = (POSITIVE_TOKENS + IMAGE_TOKENS, NEGATIVE_TOKENS + IMAGE_TOKENS)


@pytest.mark.parametrize("model_name, protected", [("one_and_one", 1), ("four_blocks", 3), ("four_blocks", 1)])
def test_tokencache_plans_each_text_length(request, model_name, protected):
    """The issue's graph: UNet -> TokenCache (no predictor) -> KSampler, with
    protected_last_blocks up to the block count minus one."""
    model = request.getfixturevalue(model_name)
    blocks = _blocks(model)
    positive, negative = _conditioning(model)
    (patched,) = TokenCacheNode.execute(model, "none", RATIO, 4, protected, 0.0, 1.0, "measured").result
    out, run = _run(patched, positive, negative)
    base = _sample(model, positive, negative)
    assert torch.isfinite(out).all() and 0 < float((out - base).norm() / base.norm()) < 0.5
    assert run.stats.evaluations == 2 * STEPS and not run.stats.notes
    assert run.stats.counts() == {"full": 4, "aggressive": 0, "conservative": STEPS - 4}
    assert run.stats.token_fraction == pytest.approx(_token_fraction(run, LAYOUTS, blocks, protected))
    assert sorted(run.last_selection) == list(range(blocks - protected))
    # Flux never batches conds of different lengths: with or without memory to spare, the same run
    assert torch.equal(out, _split(model, lambda: _run(patched, positive, negative)[0]))
    (again,) = TokenCacheNode.execute(model, "none", RATIO, 4, protected, 0.0, 1.0, "measured").result
    assert torch.equal(out, _sample(again, positive, negative))


@pytest.mark.parametrize("architecture", ["mlp_mixer", "first_block"])
def test_tokencache_predictor_plans_each_text_length(one_and_one, architecture):
    """A predictor (untrained) scores each layout's own tokens: it runs once per
    text length and P-step, and its work counts."""
    blocks, protected = _blocks(one_and_one), 1
    hidden = one_and_one.model.diffusion_model.hidden_size
    torch.manual_seed(0)
    if architecture == "mlp_mixer":
        predictor = CachePredictor(hidden, blocks)
    else:
        block, runner, kind = adapter_for(one_and_one).predictor_parts()
        predictor = FirstBlockPredictor(block, runner, hidden, blocks, kind)
    config = CacheConfig(mode="tokencache", cache_ratio=RATIO, i_steps=4, protected_last_blocks=protected)
    positive, negative = _conditioning(one_and_one)
    out, run = _run(apply_token_cache(one_and_one, config, predictor=predictor), positive, negative)
    assert torch.isfinite(out).all() and not run.stats.notes
    assert run.stats.token_fraction == pytest.approx(_token_fraction(run, LAYOUTS, blocks, protected))
    assert run.stats.predictor_flops == pytest.approx((STEPS - 4) * sum(predictor.flops(n) for n in LAYOUTS))
    assert torch.equal(out, _run(apply_token_cache(one_and_one, config, predictor=predictor), positive, negative)[0])


@pytest.mark.parametrize("model_name", ["one_and_one", "four_blocks"])
@pytest.mark.parametrize("method", ["tokencache", "duca"])
def test_batched_and_split_cfg_agree_across_text_lengths(request, model_name, method):
    """Two positive conds of one length (batched together when memory allows)
    and a negative of another (always on its own): batched and split CFG pick
    the same tokens for each layout."""
    model = request.getfixturevalue(model_name)
    blocks = _blocks(model)
    first, negative = _conditioning(model)
    second, _ = tiny_models.conditioning(FAMILY, model, seed=1, tokens=POSITIVE_TOKENS)
    positive = first + second

    def patched():
        if method == "duca":
            return duca(model, cycle_length=3)
        return apply_token_cache(model, CacheConfig(mode="tokencache", cache_ratio=RATIO, i_steps=4,
                                                     protected_last_blocks=1))
    batched_model = patched()
    batched = _sample(batched_model, positive, negative)
    batched_stats = stats_of(batched_model)
    split_model = patched()
    split = _split(model, lambda: _sample(split_model, positive, negative))
    split_stats = stats_of(split_model)
    assert batched_stats.evaluations == 2 * STEPS and split_stats.evaluations == 3 * STEPS
    assert split_stats.counts() == batched_stats.counts() and batched_stats.counts()["conservative"] > 0
    assert split_stats.token_fraction == pytest.approx(batched_stats.token_fraction)
    if method == "tokencache":
        expected = _token_fraction(_last_run(batched_model), (LAYOUTS[0], *LAYOUTS), blocks, 1)
        assert batched_stats.token_fraction == pytest.approx(expected)
    assert torch.isfinite(batched).all()
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)


# family -> sampling arguments small enough for 2 CPU cores, and the image tokens they make
FAMILY_CASES = {
    "chroma": (dict(width=32, height=32, cfg=3.0), 4),
    "hunyuan_video": (dict(width=32, height=32, cfg=2.0, frames=5), 8),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CASES))
def test_other_flux_family_models_plan_each_text_length(tiny_model, family):
    model = tiny_model(family)
    sampling, image_tokens = FAMILY_CASES[family]
    blocks = _blocks(model)
    positive, negative = tiny_models.conditioning(family, model, tokens=POSITIVE_TOKENS, neg_tokens=NEGATIVE_TOKENS)
    config = CacheConfig(mode="tokencache", cache_ratio=0.5, i_steps=2, protected_last_blocks=blocks - 1)

    def run():
        patched = apply_token_cache(model, config)
        out = tiny_models.sample(patched, family, steps=4, seed=11, positive=positive, negative=negative, **sampling)
        return out, _last_run(patched)
    out, last = run()
    assert torch.isfinite(out).all() and not last.stats.notes
    assert last.stats.evaluations == 8 and last.stats.counts() == {"full": 2, "aggressive": 0, "conservative": 2}
    layouts = (POSITIVE_TOKENS + image_tokens, NEGATIVE_TOKENS + image_tokens)
    assert last.stats.token_fraction == pytest.approx(_token_fraction(last, layouts, blocks, blocks - 1, 0.5))
    assert torch.equal(out, run()[0])
