"""TokenCache on one tiny model of every family the DuCa node supports, through
the real ComfyUI sampling path: the training node (predictor, then LoRA
refinement of the last block) lowers its losses on a run it never saw, the
file names the family by its key and is refused by another family, the
learned plan picks other tokens than random selection at the same work, and
runs repeat exactly, match between batched and split CFG and recover from an
error. (The Flux family's own model, flux_schnell, has its tests in
test_tokencache.py and test_tokencache_lora.py.)"""
import gc

import pytest
import torch

import comfy.model_management
import tiny_models

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.predictor_file import load_lora, load_predictor
from dit_token_cache.accel_core.lora import linear_layers
from dit_token_cache.nodes.families import adapter_for
from dit_token_cache.nodes.lora_training import adapters_on, lora_config, protected_blocks, record_p_steps, refinement_loss
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache
from dit_token_cache.nodes.predictor_training import (TrainingSettings, _differentiable_ops, _new_predictor, _pair_loss,
                                                      _pairs, _recorded)
from dit_token_cache.nodes.tokencache_nodes import TokenCacheNode, TokenCacheTrainPredictorNode, step_importance

# tiny model -> (its sampling sizes, training choices): one model per family key; the Flux family's
# Chroma and HunyuanVideo run its adapter, LTX-Video's blocks cannot be backpropagated through.
# The widest tiny models (Qwen-Image 3072, Lumina 2 2304, Chroma) train the mlp_mixer on first_order:
# the first-block predictor and the chained objective on them take over 10 GB of RAM (copies of a
# block's weights for autograd); those two are exercised on the five others
FIRST_ORDER_MIXER = dict(architecture="mlp_mixer", objective="first_order")
FAMILIES = {
    "wan_t2v": (dict(width=32, height=32, frames=5), dict(objective="p_step")),
    "qwen_image": (dict(width=32, height=32), FIRST_ORDER_MIXER),
    "sd3": (dict(width=128, height=128), {}),
    "pixart_sigma": (dict(width=512, height=16), {}),
    "lumina2": (dict(width=32, height=32), dict(**FIRST_ORDER_MIXER, learning_rate=3e-4)),   # large activations
    "hidream": (dict(width=64, height=64), {}),
    "ltxv": (dict(width=256, height=256, frames=9), dict(**FIRST_ORDER_MIXER, lora_rank=0)),
    "hunyuan_video": (dict(width=64, height=64, frames=5), dict(objective="p_step")),
    "chroma": (dict(width=64, height=64), dict(**FIRST_ORDER_MIXER, lora_rank=0)),
}   # Wan and HunyuanVideo train with the p_step objective (a modulewise and a Flux-family model)
TRAINING = dict(seed=0, steps=4, cfg=2.0, iterations=10, learning_rate=1e-3, cost_weight=0.05, lora_rank=2,
                cache_ratio=0.75, i_steps=2, protected_last_blocks=1)
RUN = dict(cache_ratio=0.75, i_steps=2, protected_last_blocks=1)
STEPS = 6
CFG = 2.0   # cond and uncond at every step (HunyuanVideo's default is 1)


def _training(family) -> dict:
    return {**TRAINING, **FAMILIES[family][1]}


def _inputs(family, model):
    sizes = FAMILIES[family][0]
    positive, negative = tiny_models.conditioning(family, model)
    return positive, negative, tiny_models.empty_latent(family, sizes["width"], sizes["height"], frames=sizes.get("frames"))


@pytest.fixture(scope="module")
def trained(tiny_model, predictor_dir):
    """family -> (model, predictor file path), trained once by the node."""
    done = {}

    def train(family):
        if family not in done:
            model = tiny_model(family)
            positive, negative, latent = _inputs(family, model)
            settings = _training(family)
            (path,) = TokenCacheTrainPredictorNode.execute(model, positive, negative, latent, sampler_name="euler",
                                                           scheduler="simple", filename=f"tiny_{family}",
                                                           **settings).result
            done[family] = model, path
        return done[family]
    yield train
    done.clear()
    comfy.model_management.unload_all_models()   # the next modules do not carry these models
    gc.collect()


def _run(family, model, predictor=None, precision="model", fallback="change", calibration=None):
    """A TokenCache sample (the node with a file, else apply_token_cache with `fallback` and the
    I-steps of `calibration`) and its run."""
    if predictor is not None:
        (patched,) = TokenCacheNode.execute(model, predictor, RUN["cache_ratio"], RUN["i_steps"],
                                            RUN["protected_last_blocks"], 0.0, 1.0, "measured",
                                            cache_precision=precision).result
    else:
        patched = apply_token_cache(model, CacheConfig(mode="tokencache", cache_precision=precision, **RUN),
                                    fallback=fallback, calibration=calibration)
    out = tiny_models.sample(patched, family, steps=STEPS, seed=5, cfg=CFG, **FAMILIES[family][0])
    return out, patched.model_options["transformer_options"][SETTINGS_KEY].last_run


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_training_lowers_the_losses_on_a_new_run_and_the_file_names_the_family(family, trained):
    model, path = trained(family)
    adapter = adapter_for(model)
    settings = TrainingSettings(**_training(family))
    predictor, metadata = load_predictor(path, first_block=adapter.predictor_parts)
    assert metadata["family"] == adapter.family_key and metadata["token_layout"] == adapter.token_layout
    assert metadata["blocks"] == adapter.block_count and metadata["predictor"]["architecture"] == settings.architecture
    positive, negative, latent = _inputs(family, model)
    device = model.load_device
    # the reuse loss on every pair of a trajectory training never saw: the predictor at its
    # initialisation (the same seed draws it) against the trained one
    with torch.inference_mode(False), _differentiable_ops(), torch.no_grad():
        evaluations, subset = _recorded(model, positive, negative, latent, settings, seed=99)
        untrained = _new_predictor(adapter, settings)[0].to(device)

        def loss(p):
            return sum(float(_pair_loss(adapter, p, a, b, settings, device, subset)) for a, b in _pairs(evaluations))
        before, after = loss(untrained), loss(predictor.to(device))
    assert after < before, (before, after)
    lora = load_lora(path, lambda: linear_layers(adapter.block_paths()), adapter.block_count)
    if not settings.lora_rank:
        assert lora is None
        return
    # adapters on the last block's linear layers only, and on P-steps of a new run they bring the
    # prediction made from the cached input closer to the uncached one (1 = the cache's own error)
    last = adapter.block_paths()[-1][0]
    assert lora.spec.blocks == (adapter.block_count - 1,)
    assert set(lora.spec.layers) == set(linear_layers(adapter.block_paths()[-1:])) and \
        all(layer.startswith(last + ".") for layer in lora.spec.layers)
    calibration = step_importance(metadata["calibration"], "measured")
    config = lora_config(settings)
    samples = record_p_steps(model, adapter, predictor.to(device), calibration, config, positive, negative, latent,
                             settings, seed=77)
    assert samples
    blocks = protected_blocks(adapter, settings.protected_last_blocks)
    with torch.inference_mode(False), _differentiable_ops(), torch.no_grad():
        plain = [float(refinement_loss(adapter, s, blocks, device, s.tokens.dtype, settings.cfg)) for s in samples]
        with adapters_on(model.model.diffusion_model, lora.to(device)):
            refined = [float(refinement_loss(adapter, s, blocks, device, s.tokens.dtype, settings.cfg)) for s in samples]
    # without adapters the blocks reproduce the cached prediction exactly: the relative error is 1
    assert plain == pytest.approx([1.0] * len(samples), rel=1e-3)
    assert sum(refined) < sum(plain), refined


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_learned_plan_differs_from_random_at_the_same_work(family, trained):
    model, path = trained(family)
    name = path.rsplit("/", 1)[-1]
    learned, learned_run = _run(family, model, name)
    # random scores at the learned run's I-steps: the P-steps differ in their tokens only
    adapter = adapter_for(model)
    metadata = load_predictor(path, first_block=adapter.predictor_parts)[1]
    chance, random_run = _run(family, model, fallback="random",
                              calibration=step_importance(metadata["calibration"], "measured"))
    blocks = adapter.block_count
    cached = range(blocks - RUN["protected_last_blocks"])
    assert learned_run.schedule.kinds == random_run.schedule.kinds
    assert learned_run.stats.counts() == random_run.stats.counts()
    assert learned_run.stats.token_fraction == pytest.approx(random_run.stats.token_fraction)
    assert sorted(learned_run.last_selection) == sorted(random_run.last_selection) == list(cached)
    assert any(not torch.equal(learned_run.last_selection[b], random_run.last_selection[b]) for b in cached)
    assert learned_run.stats.predictor_flops > 0 and random_run.stats.predictor_flops == 0
    assert torch.isfinite(learned).all() and not torch.equal(learned, chance)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_deterministic_cfg_split_matches_batched_and_reset_after_an_error(family, trained):
    model, path = trained(family)
    name = path.rsplit("/", 1)[-1]
    first, run = _run(family, model, name)
    assert run.stats.counts()["conservative"] > 0 and not run.stats.notes
    assert torch.equal(first, _run(family, model, name)[0])
    with tiny_models.split_cfg(model):
        split, split_run = _run(family, model, name)
    assert split_run.stats.evaluations == 2 * run.stats.evaluations
    # scaled: the tiny PixArt's latents reach thousands (test_families_modulewise.py)
    torch.testing.assert_close(split, first, rtol=1e-4, atol=1e-4 * max(1.0, float(first.abs().max())))
    (patched,) = TokenCacheNode.execute(model, name, RUN["cache_ratio"], RUN["i_steps"], RUN["protected_last_blocks"],
                                        0.0, 1.0, "measured", cache_precision="model").result
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    with pytest.raises(RuntimeError, match="boom"):
        tiny_models.sample(tiny_models.failing_clone(patched), family, steps=STEPS, seed=5, cfg=CFG, **FAMILIES[family][0])
    assert settings.active_run is None
    assert torch.equal(_run(family, model, name)[0], first)


def test_a_file_for_another_family_is_refused(trained):
    wan, path = trained("wan_t2v")
    qwen = trained("qwen_image")[0]
    with pytest.raises(ValueError, match=r"tiny_wan_t2v.safetensors.*trained for family='wan'.*'qwen_image'"):
        TokenCacheNode.execute(qwen, path.rsplit("/", 1)[-1], 0.75, 2, 1, 0.0, 1.0, "measured")


@pytest.mark.parametrize("choice", [dict(architecture="first_block", objective="first_order", lora_rank=0),
                                    dict(architecture="mlp_mixer", objective="chained", lora_rank=0),
                                    dict(architecture="mlp_mixer", objective="first_order", lora_rank=2)])
def test_ltxv_training_that_needs_a_backward_pass_through_its_blocks_is_refused(tiny_model, choice):
    model = tiny_model("ltxv")
    positive, negative, latent = _inputs("ltxv", model)
    with pytest.raises(ValueError, match="LTX-Video blocks update their tensors in place.*use architecture mlp_mixer, "
                                         "objective first_order and lora_rank 0"):
        TokenCacheTrainPredictorNode.execute(model, positive, negative, latent, sampler_name="euler", scheduler="simple",
                                             filename="refused", **{**TRAINING, **choice})


@pytest.mark.parametrize("family", ["flux_schnell", "hunyuan_video", "wan_t2v", "sd3", "pixart_sigma", "hidream"])
def test_p_step_objective_runs_each_block_as_a_p_step_does(family, tiny_model):
    """With every token recomputed and the cache from this very step, a block
    run as a P-step runs it (attention reused, token-wise branches mixed) is
    the block itself; with none recomputed it returns the cached branches,
    re-gated, whatever its input; with all recomputed on a stale cache it
    follows its input (the token-wise branch is fresh)."""
    model = tiny_model(family)
    adapter = adapter_for(model)
    sizes = FAMILIES.get(family, (dict(width=64, height=64), {}))[0]
    positive, negative = tiny_models.conditioning(family, model)
    latent = tiny_models.empty_latent(family, sizes["width"], sizes["height"], frames=sizes.get("frames"))
    settings = TrainingSettings(**{**TRAINING, "objective": "p_step"})
    with torch.inference_mode(False), _differentiable_ops(), torch.no_grad():
        evaluations, _ = _recorded(model, positive, negative, latent, settings, seed=3)
        previous, current = _pairs(evaluations)[-1]
        x = current.inputs.tokens
        txt_len = adapter.text_length(current.inputs.block_args)
        ones = torch.ones(x.shape[:2])
        for block_id in range(adapter.block_count):
            args = current.block_args[block_id]
            assert current.branches[block_id], block_id
            full = current.deltas[:, block_id].float()
            own = adapter.p_step_contribution(block_id, x, args, txt_len, x.dtype, ones, current.branches[block_id])
            torch.testing.assert_close(own.float(), full, rtol=1e-4, atol=1e-4 * max(1.0, float(full.abs().max())))
            moved = x + torch.randn(x.shape, generator=torch.Generator().manual_seed(block_id)).to(x.dtype) * x.std()

            def stale(a, tokens=x):
                return adapter.p_step_contribution(block_id, tokens, args, txt_len, x.dtype, a,
                                                   previous.branches[block_id]).float()
            reused = stale(ones * 0)
            assert not torch.allclose(reused, full, rtol=1e-3, atol=1e-3), block_id
            # rounding of (x + contribution) - x grows with x
            torch.testing.assert_close(stale(ones * 0, moved), reused, rtol=1e-4,
                                       atol=1e-5 * max(1.0, float(moved.abs().max())))
            assert not torch.allclose(stale(ones, moved), stale(ones), rtol=1e-3, atol=1e-3), block_id
            x = x + current.deltas[:, block_id]
