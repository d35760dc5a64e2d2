"""TokenCache's LoRA refinement of the protected last blocks on a tiny Flux
through ComfyUI's real sampling path: untrained adapters change nothing,
trained ones sit in the last blocks only and act at P-steps only, the file
round-trips, adapters that do not fit are refused, and a user's LoRA keeps
applying."""
import collections

import pytest
import safetensors.torch
import torch

import comfy.sd
import tiny_models

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.lora import BlockLoRA, LoRASpec, linear_layers
from dit_token_cache.accel_core.predictor_file import PredictorFileError, load_lora, load_predictor, save_predictor
from dit_token_cache.accel_core.schedule import StepKind
from dit_token_cache.nodes.families import adapter_for
from dit_token_cache.nodes.lora_training import (adapters_on, guided, lora_config, new_lora, protected_blocks,
                                                 record_p_steps, refinement_loss)
from dit_token_cache.nodes.predictor_training import TrainingSettings, _differentiable_ops
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache
from dit_token_cache.nodes.tokencache_nodes import TokenCacheNode, TokenCacheTrainPredictorNode

FAMILY = "flux_schnell"
STEPS = 8
SAMPLING = dict(steps=STEPS, cfg=2.0, seed=3, width=64, height=64)
TRAINING = dict(seed=0, steps=6, cfg=2.0, iterations=24, learning_rate=3e-3, cost_weight=0.05)
PROTECTED = 2     # of the tiny Flux's 4 blocks (2 double, 2 single)
CONFIG = CacheConfig(mode="tokencache", cache_ratio=0.75, i_steps=3, protected_last_blocks=PROTECTED)


@pytest.fixture(scope="module")
def flux(tiny_model):
    return tiny_model(FAMILY)


@pytest.fixture(scope="module")
def trained(flux, predictor_dir):
    """A predictor with rank-4 adapters on the last 2 blocks, trained by the node."""
    positive, negative = tiny_models.conditioning(FAMILY, flux)
    latent = tiny_models.empty_latent(FAMILY, 64, 64)
    (path,) = TokenCacheTrainPredictorNode.execute(
        flux, positive, negative, latent, filename="tiny_flux_lora", sampler_name="euler", scheduler="simple",
        **TRAINING, lora_rank=4, cache_ratio=0.75, i_steps=3, protected_last_blocks=PROTECTED).result
    return path


def _adapter(model):
    return adapter_for(model)


def _load_lora(model, path):
    adapter = _adapter(model)
    return load_lora(path, lambda: linear_layers(adapter.block_paths()), adapter.block_count)


def _sample(model):
    return tiny_models.sample(model, FAMILY, **SAMPLING)


def _random_lora(model, seed=0):
    lora = new_lora(_adapter(model), PROTECTED, 4, seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in lora.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return lora.requires_grad_(False)


def test_zero_adapters_leave_the_output_bit_identical(flux):
    lora = new_lora(_adapter(flux), PROTECTED, 4, seed=0).requires_grad_(False)
    assert all(float(lora.adapter(layer).up.abs().max()) == 0 for layer in lora.spec.layers)
    assert torch.equal(_sample(apply_token_cache(flux, CONFIG, lora=lora)), _sample(apply_token_cache(flux, CONFIG)))


def test_adapters_act_at_p_steps_only_and_on_the_clone_only(flux):
    lora = _random_lora(flux)
    patched = apply_token_cache(flux, CONFIG, lora=lora)
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    calls = collections.Counter()
    work = []

    def seen(module, args, out):
        calls.update([settings.active_run.plan.kind])
        work.append(module.flops(args[0].numel() // args[0].shape[-1]))
    for layer in lora.spec.layers:
        lora.adapter(layer).register_forward_hook(seen)
    base = _sample(flux)
    with_lora = _sample(patched)
    run = settings.last_run
    p_steps = run.stats.counts()["conservative"]
    assert p_steps > 0 and set(calls) == {StepKind.CONSERVATIVE}
    # every adapted layer once per P-step (cond and uncond batched into one evaluation)
    assert calls[StepKind.CONSERVATIVE] == p_steps * len(lora.spec.layers)
    # their work counts as computed work, like the predictor's
    assert run.stats.adapter_flops == pytest.approx(sum(work)) and run.stats.adapter_flops > 0
    assert "LoRA" in run.stats.summary("TokenCache")
    assert not torch.equal(with_lora, _sample(apply_token_cache(flux, CONFIG)))
    # the input model runs as before: ComfyUI put each layer's own forward back
    assert torch.equal(_sample(flux), base)
    modules = [flux.model.diffusion_model.get_submodule(layer) for layer in lora.spec.layers]
    assert all(getattr(m.forward, "__func__", None) is type(m).forward for m in modules)


def test_training_refines_the_last_blocks_only_and_the_file_round_trips(flux, trained):
    adapter = _adapter(flux)
    lora = _load_lora(flux, trained)
    _, metadata = load_predictor(trained, first_block=adapter.predictor_parts)
    assert metadata["lora"]["rank"] == 4 and metadata["lora"]["blocks"] == [2, 3]
    summary = metadata["training"]["lora"]
    # the loss is the cache's error relative to its error without adapters: it starts at 1 and falls
    assert summary["final_loss"] < summary["first_loss"] <= 1.0 + 1e-6, summary
    # every linear layer of the last 2 blocks, nothing else
    assert set(lora.spec.layers) == set(linear_layers(adapter.block_paths()[-PROTECTED:])) != set()
    assert any(float(lora.adapter(layer).up.abs().max()) > 0 for layer in lora.spec.layers)
    # the file holds exactly these tensors
    stored = {k: v for k, v in safetensors.torch.load_file(trained).items() if k.startswith("lora.")}
    assert stored.keys() == lora.tensors().keys()
    assert all(torch.equal(stored[k], v) for k, v in lora.tensors().items())
    # the TokenCache node applies them: object patches on those layers only
    (patched,) = TokenCacheNode.execute(flux, "tiny_flux_lora.safetensors", 0.75, 3, PROTECTED, 0.0, 1.0).result
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    assert settings.name == "TokenCache[learned+LoRA]"
    assert sorted(patched.object_patches) == sorted(f"diffusion_model.{layer}.forward" for layer in lora.spec.layers)
    (adapters_removed,) = TokenCacheNode.execute(flux, "tiny_flux_lora.safetensors", 0.75, 3, PROTECTED, 0.0, 1.0).result
    adapters_removed.object_patches.clear()   # this clone's own dict: the same run without the adapters
    assert not torch.equal(_sample(patched), _sample(adapters_removed))


def test_protecting_fewer_blocks_than_the_adapters_refine_is_refused(flux, trained):
    with pytest.raises(ValueError, match=r"protected_last_blocks=1 leaves \[2\] cached: use protected_last_blocks >= 2"):
        TokenCacheNode.execute(flux, "tiny_flux_lora.safetensors", 0.75, 3, 1, 0.0, 1.0)
    # more protected blocks than the adapters need is fine
    TokenCacheNode.execute(flux, "tiny_flux_lora.safetensors", 0.75, 3, 3, 0.0, 1.0)


def _rewrite(model, source, target, lora):
    """`source`'s predictor saved again with other adapters."""
    predictor, metadata = load_predictor(source, first_block=_adapter(model).predictor_parts)
    metadata = {k: v for k, v in metadata.items() if k not in ("format", "format_version", "predictor", "lora")}
    save_predictor(str(target), predictor, metadata, lora)


@pytest.mark.parametrize("case, message", [
    ("missing layer", "no linear layer for adapters single_blocks.1.nonexistent"),
    ("wrong shape", r"adapter single_blocks.1.linear2.down has shape"),
    ("block out of range", r"adapters for blocks \[9\] of a model with 4 blocks"),
    ("nan", "hold NaN or infinite values"),
])
def test_adapters_that_do_not_fit_the_model_are_refused(flux, trained, predictor_dir, case, message):
    real = _load_lora(flux, trained)
    shapes = linear_layers(_adapter(flux).block_paths())
    layer = "single_blocks.1.linear2"

    def misfit():
        if case == "missing layer":
            spec = LoRASpec(4, 4.0, (3,), ("single_blocks.1.nonexistent",))
            return BlockLoRA(spec, {"single_blocks.1.nonexistent": (8, 8)})
        if case == "wrong shape":
            spec = LoRASpec(4, 4.0, (3,), (layer,))
            return BlockLoRA(spec, {layer: (shapes[layer][0] + 1, shapes[layer][1])})
        if case == "block out of range":
            spec = LoRASpec(4, 4.0, (9,), (layer,))
            return BlockLoRA(spec, {layer: shapes[layer]})
        lora = BlockLoRA(LoRASpec(4, 4.0, (3,), (layer,)), {layer: shapes[layer]})
        lora.load_tensors({k: v for k, v in real.tensors().items() if k.startswith(f"lora.{layer}.")})
        with torch.no_grad():
            lora.adapter(layer).up[0, 0] = float("nan")
        return lora
    target = predictor_dir / f"bad_{case.replace(' ', '_')}.safetensors"
    _rewrite(flux, trained, target, misfit())
    with pytest.raises(PredictorFileError, match=message):
        _load_lora(flux, str(target))
    with pytest.raises(ValueError, match="LoRA adapters do not fit this model"):
        TokenCacheNode.execute(flux, target.name, 0.75, 3, PROTECTED, 0.0, 1.0)


def _user_lora(dm, rank=4, seed=1):
    """A LoRA in the usual file layout on a layer our adapters refine too, and one they do not."""
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name in ("single_blocks.1.linear2", "double_blocks.0.img_mlp.0"):
        weight = dm.get_submodule(name).weight
        lora[f"diffusion_model.{name}.lora_up.weight"] = 0.05 * torch.randn(weight.shape[0], rank, generator=g)
        lora[f"diffusion_model.{name}.lora_down.weight"] = 0.05 * torch.randn(rank, weight.shape[1], generator=g)
    return lora


def test_a_user_lora_applied_before_the_node_still_applies(flux):
    lora = _random_lora(flux)
    with_user_lora, _ = comfy.sd.load_lora_for_models(flux, None, _user_lora(flux.model.diffusion_model), 1.0, 0)
    ours = _sample(apply_token_cache(flux, CONFIG, lora=lora))
    both = _sample(apply_token_cache(with_user_lora, CONFIG, lora=lora))
    assert not torch.allclose(ours, both, atol=1e-4)
    # where nothing caches (cycle_length 1 equivalent: every step full), the user's LoRA alone decides
    full = CacheConfig(mode="tokencache", cache_ratio=0.75, i_steps=STEPS, protected_last_blocks=PROTECTED)
    assert torch.equal(_sample(apply_token_cache(with_user_lora, full, lora=lora)), _sample(with_user_lora))


def test_guided_combines_batched_cond_and_uncond_only():
    cond, uncond = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    assert torch.equal(guided(torch.cat((cond, uncond)), [0, 1], 4.0), 4.0 * cond)
    assert torch.equal(guided(torch.cat((uncond, cond)), [1, 0], 4.0), 4.0 * cond)
    alone = torch.randn(2, 3, 4)
    assert torch.equal(guided(alone, [0], 4.0), alone)


@pytest.mark.parametrize("protected", [2, 3])   # single blocks only; a double block and the single blocks
def test_training_reproduces_the_cached_prediction_before_it_learns(flux, protected):
    """Run from the recorded input of the first protected block, the blocks and
    the output layer give what the cached run gave: with untrained adapters
    each P-step's loss (its error relative to the cached run's) is exactly 1."""
    adapter = _adapter(flux)
    positive, negative = tiny_models.conditioning(FAMILY, flux)
    latent = tiny_models.empty_latent(FAMILY, 64, 64)
    settings = TrainingSettings(steps=6, cfg=2.0, cache_ratio=0.75, i_steps=3, protected_last_blocks=protected,
                                lora_rank=4)
    config = lora_config(settings)
    samples = record_p_steps(flux, adapter, None, None, config, positive, negative, latent, settings, seed=4)
    assert len(samples) == 6 - 3
    lora = new_lora(adapter, protected, 4, seed=0)
    blocks = protected_blocks(adapter, protected)
    with torch.inference_mode(False), torch.no_grad(), _differentiable_ops(), \
            adapters_on(flux.model.diffusion_model, lora):
        for sample in samples:
            loss = refinement_loss(adapter, sample, blocks, "cpu", sample.tokens.dtype, settings.cfg)
            assert float(loss) == pytest.approx(1.0, abs=1e-4)


def test_with_adapters_runs_repeat_exactly_and_split_cfg_matches_batched(flux, trained):
    def run():
        (patched,) = TokenCacheNode.execute(flux, "tiny_flux_lora.safetensors", 0.75, 3, PROTECTED, 0.0, 1.0,
                                            cache_precision="model").result
        out = _sample(patched)
        return out, patched.model_options["transformer_options"][SETTINGS_KEY].last_run
    first, first_run = run()
    assert torch.equal(first, run()[0])
    with tiny_models.split_cfg(flux):
        split, split_run = run()
    assert split_run.stats.evaluations == 2 * first_run.stats.evaluations
    # the adapters did the same work either way, and the images agree to float rounding
    assert first_run.stats.adapter_flops > 0
    assert split_run.stats.adapter_flops == pytest.approx(first_run.stats.adapter_flops)
    torch.testing.assert_close(split, first, rtol=1e-4, atol=1e-4)
