"""Before a run, ComfyUI's model loading keeps free what the cache will take
(EXTRA_RESERVED_VRAM while sampling). Without a memory budget, the first run
of a latent size reserves the projection of accel_core/memory.py from the
family adapter's layout: it must be what the run then takes, byte for byte,
on every family, with cond and uncond of different text lengths, for every
mode, selector kind and precision."""
import pytest
import torch

import comfy.model_management
import tiny_models
from test_families_modulewise import CASES

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache

SIZES = {**CASES, "flux_schnell": {}, "flux_dev": {}, "flux2": {}, "chroma": dict(width=32, height=32),
         "hunyuan_video": dict(width=32, height=32, frames=5)}
SETTINGS = {
    "duca": dict(mode="duca"),   # forecast linear: two copies of every feature
    "toca_similarity_fp8": dict(mode="toca", selector="similarity", cache_precision="fp8", forecast="reuse"),
    "fora_bf16": dict(mode="fora", cache_precision="bf16"),
    "tokencache": dict(mode="tokencache"),   # training-free scores: a change score per planned token
}


def _reserved_and_taken(model, family, settings, batch=1, **size):
    """(what ComfyUI had reserved for the cache while the model ran, the cache's peak) of a first run."""
    usual = comfy.model_management.extra_reserved_memory()
    patched = apply_token_cache(model, CacheConfig(cycle_length=3, cache_ratio=0.75, **settings))
    seen = set()

    def watch(apply_model, args):
        seen.add(comfy.model_management.extra_reserved_memory() - usual)
        return apply_model(args["input"], args["timestep"], **args["c"])
    patched.set_model_unet_function_wrapper(watch)
    positive, negative = tiny_models.conditioning(family, model, tokens=16, neg_tokens=12, batch=batch)
    latent = tiny_models.empty_latent(family, batch=batch, **{"width": 64, "height": 64, **size})
    tiny_models.sample(patched, family, steps=7, seed=3, cfg=2.0, positive=positive, negative=negative, latent=latent)
    assert len(seen) == 1
    return seen.pop(), patched.model_options["transformer_options"][SETTINGS_KEY].last_run.stats.peak_cache_bytes


@pytest.fixture(scope="module", params=sorted(SIZES))
def family_model(request, tiny_model):
    return request.param, tiny_model(request.param)


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_first_run_reserves_what_the_cache_takes(family_model, name):
    family, model = family_model
    reserved, taken = _reserved_and_taken(model, family, SETTINGS[name], **SIZES[family])
    assert taken > 0 and reserved == taken, (reserved, taken)


@pytest.mark.parametrize("selector", ["k_norm", "v_norm", "attention"])
def test_projection_covers_the_attention_selectors(tiny_model, selector):
    reserved, taken = _reserved_and_taken(tiny_model("flux_schnell"), "flux_schnell",
                                          dict(mode="toca", selector=selector, cache_precision="bf16"))
    assert reserved == taken


def test_projection_counts_every_row_of_a_batch(tiny_model):
    model = tiny_model("wan_t2v")
    one, _ = _reserved_and_taken(model, "wan_t2v", {}, **CASES["wan_t2v"])
    reserved, taken = _reserved_and_taken(model, "wan_t2v", {}, batch=3, **CASES["wan_t2v"])
    assert reserved == taken > 2 * one


def test_a_failed_projection_reserves_nothing_and_the_run_goes_on(tiny_model, caplog):
    model = tiny_model("flux_schnell")
    usual = comfy.model_management.extra_reserved_memory()
    patched = apply_token_cache(model, CacheConfig(cycle_length=3))
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]

    def broken(model_conds):
        raise RuntimeError("no text length")
    settings.adapter.text_tokens = broken
    seen = set()

    def watch(apply_model, args):
        seen.add(comfy.model_management.extra_reserved_memory() - usual)
        return apply_model(args["input"], args["timestep"], **args["c"])
    patched.set_model_unet_function_wrapper(watch)
    out = tiny_models.sample(patched, "flux_schnell", steps=7, seed=3, cfg=2.0)
    assert seen == {0} and "could not be projected" in caplog.text and settings.active_run is None
    reference = tiny_models.sample(apply_token_cache(model, CacheConfig(cycle_length=3)), "flux_schnell", steps=7,
                                   seed=3, cfg=2.0)
    assert torch.equal(out, reference)
