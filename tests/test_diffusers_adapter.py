"""dit_token_cache.diffusers on real diffusers (tiny random configs of each
supported transformer, CPU), sampled by a flow-matching Euler loop over
diffusers' own scheduler as its pipelines do (true CFG as separate calls or a
batch, timesteps scaled as each family's pipeline passes them)."""
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from dit_token_cache.diffusers import apply_token_cache

TEXT, TEXT_DIM = 6, 32


def _random(model):
    with torch.no_grad():   # diffusers zero-initialises some projections: random everywhere, so every block acts
        for parameter in model.parameters():
            parameter.normal_(0.0, parameter.shape[-1] ** -0.5 if parameter.ndim >= 2 else 0.1)
    return model.eval()


def _flux_ids():
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float(), torch.zeros(TEXT, 3)


@dataclass
class Family:
    name: str
    build: Callable
    latent: tuple                 # one sample's latent shape, as the pipeline hands it to the transformer
    call: Callable                # (model, latents, text, timestep tensor [B]) -> the transformer's output
    timestep_scale: float         # the pipeline passes timestep = scheduler timestep (0..1000) / 1000 x this
    image_mlp: str                # block 0's token-wise module on the image stream


def _flux():
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=3, attention_head_dim=32,
                                  num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=16,
                                  guidance_embeds=False, axes_dims_rope=(4, 14, 14))


def _flux_call(model, latents, text, t):
    img_ids, txt_ids = _flux_ids()
    return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=text[:, 0, :16], timestep=t,
                 img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]


def _wan():
    from diffusers import WanTransformer3DModel
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                 out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=3,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)


def _wan_call(model, latents, text, t):
    return model(hidden_states=latents, timestep=t, encoder_hidden_states=text, return_dict=False)[0]


def _qwen():
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=3, attention_head_dim=16,
                                       num_attention_heads=2, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))


def _qwen_call(model, latents, text, t):
    return model(hidden_states=latents, encoder_hidden_states=text,
                 encoder_hidden_states_mask=torch.ones(text.shape[:2]), timestep=t,
                 img_shapes=[(1, 4, 4)] * latents.shape[0], return_dict=False)[0]


def _sd3():   # SD3.5 layout: block 0 has the image-only second attention; the last block is context_pre_only
    from diffusers import SD3Transformer2DModel
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16,
                                 num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                 dual_attention_layers=(0,))


def _sd3_call(model, latents, text, t):
    return model(hidden_states=latents, encoder_hidden_states=text, pooled_projections=text[:, 0, :16], timestep=t,
                 return_dict=False)[0]


FAMILIES = {
    "flux": Family("flux", _flux, (16, 64), _flux_call, 1.0, "transformer_blocks.0.ff"),
    "wan": Family("wan", _wan, (4, 2, 8, 8), _wan_call, 1000.0, "blocks.0.ffn"),
    "qwen_image": Family("qwen_image", _qwen, (16, 16), _qwen_call, 1.0, "transformer_blocks.0.img_mlp"),
    "sd3": Family("sd3", _sd3, (4, 8, 8), _sd3_call, 1000.0, "transformer_blocks.0.ff"),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    torch.manual_seed(0)
    spec = FAMILIES[request.param]
    return spec, _random(spec.build())


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    return _random(_flux())


def _scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler()


def sample(transformer, scheduler, steps=8, cfg=3.0, batched=False, seed=0, spec=FAMILIES["flux"]):
    """Euler over scheduler's sigmas with true CFG: cond then uncond calls, or one batch of both."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, *spec.latent, generator=generator)
    cond, uncond = torch.randn(2, 1, TEXT, TEXT_DIM, generator=generator)
    scheduler.set_timesteps(steps)

    def call(latents, text, t):
        return spec.call(transformer, latents, text, (t / 1000 * spec.timestep_scale).expand(latents.shape[0]))
    with torch.no_grad():
        for t in scheduler.timesteps:
            if batched:
                v_cond, v_uncond = call(torch.cat([x, x]), torch.cat([cond, uncond]), t).chunk(2)
            else:
                v_cond, v_uncond = call(x, cond, t), call(x, uncond, t)
            x = scheduler.step(v_uncond + cfg * (v_cond - v_uncond), t, x, return_dict=False)[0]
    return x


def test_cycle_length_one_is_the_model_itself(family):
    spec, transformer = family
    scheduler = _scheduler()
    expected = sample(transformer, scheduler, spec=spec)
    handle = apply_token_cache(transformer, scheduler=scheduler, cycle_length=1)
    try:
        assert torch.equal(sample(transformer, scheduler, spec=spec), expected)
        assert handle.summary().startswith("DuCa") and "1.00x" in handle.summary()
    finally:
        handle.remove()


@pytest.mark.parametrize("mode", ["duca", "toca", "fora"])
def test_caches_save_work_and_stay_close(family, mode):
    spec, transformer = family
    scheduler = _scheduler()
    expected = sample(transformer, scheduler, spec=spec)
    handle = apply_token_cache(transformer, scheduler=scheduler, mode=mode, cycle_length=3, forecast="reuse")
    try:
        got = sample(transformer, scheduler, spec=spec)
        stats = handle.run.stats
        assert stats.work_fraction < 0.9 and not torch.equal(got, expected)
        assert (got - expected).norm() < 0.5 * expected.norm()
        assert stats.evaluations == 16   # 8 steps x (cond, uncond)
    finally:
        handle.remove()


def test_tokencache_without_a_predictor(family):
    """mode tokencache: I-steps in full, P-steps recompute the planned tokens of the unprotected blocks."""
    spec, transformer = family
    scheduler = _scheduler()
    expected = sample(transformer, scheduler, spec=spec)
    handle = apply_token_cache(transformer, scheduler=scheduler, mode="tokencache", i_steps=4, protected_last_blocks=1)
    try:
        got = sample(transformer, scheduler, spec=spec)
        stats = handle.run.stats
        assert stats.work_fraction < 0.9 and not torch.equal(got, expected)
        assert (got - expected).norm() < 0.5 * expected.norm()
        assert handle.summary().startswith("TokenCache[fallback]") and "4 full" in handle.summary(), handle.summary()
        # the P-steps recompute what the planner chose: block 0's tokens at the last one are its plan's
        (plan,) = handle.run.step_plans.values()
        (blocks,) = plan.values()
        assert torch.equal(handle.run.last_selection[0], blocks[0].to(handle.run.last_selection[0].device))
        assert torch.equal(sample(transformer, scheduler, spec=spec), got)
        # a batched CFG call is one cond here, planned from all its rows (split calls: from the first call's),
        # so batched and split plan other tokens: both stay close to the uncached run
        batched = sample(transformer, scheduler, batched=True, spec=spec)
        assert (batched - expected).norm() < 0.5 * expected.norm() and handle.run.stats.work_fraction < 0.9
    finally:
        handle.remove()


def test_remove_restores_the_transformer(family):
    spec, transformer = family
    scheduler = _scheduler()
    expected = sample(transformer, scheduler, spec=spec)
    handle = apply_token_cache(transformer, scheduler=scheduler, cycle_length=3)
    sample(transformer, scheduler, spec=spec)
    handle.remove()
    assert torch.equal(sample(transformer, scheduler, spec=spec), expected)
    assert all(getattr(module, "_diffusers_hook", None) is None or not module._diffusers_hook.hooks
               for module in transformer.modules())
    assert not hasattr(transformer, "_dit_token_cache")


def test_two_calls_in_a_row_are_two_fresh_runs(family):
    spec, transformer = family
    scheduler = _scheduler()
    handle = apply_token_cache(transformer, scheduler=scheduler, cycle_length=3, forecast="linear")
    try:
        first, second = sample(transformer, scheduler, spec=spec), sample(transformer, scheduler, spec=spec)
        other = sample(transformer, scheduler, seed=1, spec=spec)
        assert torch.equal(first, second) and not torch.equal(first, other)
        assert handle.run.stats.evaluations == 16
    finally:
        handle.remove()
    fresh = apply_token_cache(transformer, scheduler=scheduler, cycle_length=3, forecast="linear")
    try:
        assert torch.equal(sample(transformer, scheduler, spec=spec), first)
    finally:
        fresh.remove()


@pytest.mark.parametrize("mode", ["duca", "toca"])
def test_cfg_as_a_batch_equals_separate_calls(family, mode):
    spec, transformer = family
    scheduler = _scheduler()
    handle = apply_token_cache(transformer, scheduler=scheduler, mode=mode, cycle_length=3)
    try:
        separate = sample(transformer, scheduler, spec=spec)
        batched = sample(transformer, scheduler, batched=True, spec=spec)
        assert torch.allclose(batched, separate, atol=1e-5, rtol=1e-5)
    finally:
        handle.remove()


def test_conservative_step_recomputes_exactly_the_selected_tokens(family):
    spec, transformer = family
    """Block 0's image feed-forward at a ToCa conservative step: the selected
    tokens are its fresh output on this step's input (the module's own class
    forward, computed here independently), every other token is what the full
    step before computed."""
    scheduler = _scheduler()
    handle = apply_token_cache(transformer, scheduler=scheduler, mode="toca", cycle_length=2, cache_ratio=0.5)
    ff = transformer.get_submodule(spec.image_mlp)
    seen = []
    watch = ff.register_forward_hook(lambda module, args, output: seen.append((args[0].clone(), output.clone())))
    try:
        sample(transformer, scheduler, steps=2, cfg=1.0, spec=spec)
    finally:
        watch.remove()
    try:
        (_, full), _, (x, out), _ = seen      # step 0 cond/uncond (full), step 1 cond/uncond (conservative)
        selected = handle.run.last_selection[0]
        assert 0 < selected.numel() < x.shape[1]
        assert selected.numel() == handle.config.recompute_count(x.shape[1])
        fresh = type(ff).forward(ff, x)
        others = torch.ones(x.shape[1], dtype=torch.bool)
        others[selected] = False
        assert torch.allclose(out[:, selected], fresh[:, selected], atol=1e-6)
        assert torch.equal(out[:, others], full[:, others])
        assert not torch.allclose(out[:, others], fresh[:, others], atol=1e-4)
    finally:
        handle.remove()


def test_a_memory_budget_caches_the_blocks_that_fit(family):
    """cache_budget_gb: the blocks cached at the first call of the first step are decided again when
    the second (uncond) call shows there are two conds; the cache stays within the budget, the
    blocks beyond it compute in full, and batched CFG keeps the same blocks."""
    spec, transformer = family
    scheduler = _scheduler()
    handle = apply_token_cache(transformer, scheduler=scheduler, cycle_length=3, forecast="linear")
    try:
        sample(transformer, scheduler, spec=spec)
        unlimited = handle.run.stats
    finally:
        handle.remove()
    budget = unlimited.peak_cache_bytes * 0.5
    handle = apply_token_cache(transformer, scheduler=scheduler, cycle_length=3, forecast="linear",
                               cache_budget_gb=budget / 2**30)
    try:
        split = sample(transformer, scheduler, spec=spec)
        run = handle.run
        cached, blocks = run.stats.blocks_cached
        assert 0 < cached < blocks and run.conds == 2, run.stats.blocks_cached
        assert run.stats.peak_cache_bytes <= budget, (run.stats.peak_cache_bytes, budget)
        assert run.stats.work_fraction > unlimited.work_fraction
        batched = sample(transformer, scheduler, batched=True, spec=spec)
        assert handle.run.block_cached == run.block_cached and handle.run.conds == 1
        torch.testing.assert_close(batched, split, rtol=1e-4, atol=1e-4)
    finally:
        handle.remove()


def test_a_flux_pipeline_call(transformer):
    """diffusers' own FluxPipeline (text given as embeddings, so no text encoders), true CFG as
    separate cond / uncond calls, its scheduler's shifted sigmas: each call is one fresh run."""
    from diffusers import FluxPipeline
    pipe = FluxPipeline(scheduler=_scheduler(), vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond = torch.randn(2, 1, TEXT, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    pooled = cond[:, 0, :16]

    def generate():
        return pipe(prompt_embeds=cond, pooled_prompt_embeds=pooled, negative_prompt_embeds=uncond,
                    negative_pooled_prompt_embeds=pooled, true_cfg_scale=3.0, height=64, width=64,
                    num_inference_steps=8, output_type="latent", generator=torch.Generator().manual_seed(1)).images
    expected = generate()
    handle = apply_token_cache(transformer, scheduler=pipe.scheduler, cycle_length=1)
    assert torch.equal(generate(), expected)
    handle = apply_token_cache(transformer, scheduler=pipe.scheduler, cycle_length=3, forecast="linear")
    try:
        first, second = generate(), generate()
        assert torch.equal(first, second) and not torch.equal(first, expected)
        assert (first - expected).norm() < 0.5 * expected.norm()
        assert handle.run.stats.evaluations == 16 and "(8 steps: 3 full, 3 aggressive, 2 conservative)" in handle.summary()
    finally:
        handle.remove()
    assert torch.equal(generate(), expected)


def test_bad_settings_and_models_are_refused_clearly(transformer):
    scheduler = _scheduler()
    with pytest.raises(ValueError, match="does not support this diffusers model yet: Linear"):
        apply_token_cache(torch.nn.Linear(2, 2), scheduler=scheduler)
    with pytest.raises(ValueError, match="needs scheduler=pipe.scheduler"):
        apply_token_cache(transformer)
    with pytest.raises(ValueError, match="cache_ratio"):
        apply_token_cache(transformer, scheduler=scheduler, cache_ratio=2.0)
    with pytest.raises(ValueError, match="predictor= is TokenCache's: give mode='tokencache'"):
        apply_token_cache(transformer, scheduler=scheduler, predictor="flux.safetensors")
    with pytest.raises(ValueError, match="flux.safetensors: no such file"):
        apply_token_cache(transformer, scheduler=scheduler, mode="tokencache", predictor="flux.safetensors")
    with pytest.raises(ValueError, match="i_step_placement='paper'; accepted: measured, predicted, even"):
        apply_token_cache(transformer, scheduler=scheduler, mode="tokencache", i_step_placement="paper")
    with pytest.raises(ValueError, match="selector='k_norm'"):
        apply_token_cache(transformer, scheduler=scheduler, selector="k_norm")
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in transformer.modules())


def test_the_package_imports_without_comfyui(tmp_path):
    """`import dit_token_cache.diffusers` in a process where ComfyUI is not importable."""
    import subprocess
    import sys
    from conftest import REPO
    code = (f"import importlib.util, sys; spec = importlib.util.spec_from_file_location('dit_token_cache', "
            f"{str(REPO / '__init__.py')!r}, submodule_search_locations=[{str(REPO)!r}]); "
            "module = importlib.util.module_from_spec(spec); sys.modules['dit_token_cache'] = module; "
            "spec.loader.exec_module(module); from dit_token_cache.diffusers import apply_token_cache; "
            "assert not any(name == 'comfy' or name.startswith(('comfy.', 'comfy_')) for name in sys.modules), "
            "sorted(n for n in sys.modules if n.startswith('comfy')); print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_pip_install_gives_the_library(tmp_path):
    """`pip install .` from a clone: dit_token_cache.diffusers imports from site-packages, without ComfyUI."""
    import shutil
    import subprocess
    import sys
    from conftest import REPO
    source = tmp_path / "clone"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", ".dtc", "bench", "tests", "docs", "workflows",
                                                                "reference", "__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(tmp_path / "site"), str(source)], check=True, capture_output=True)
    code = ("import sys; import dit_token_cache.diffusers as d; assert d.apply_token_cache; "
            "assert 'site' in d.__file__ and not [n for n in sys.modules if n.split('.')[0] in ('comfy', 'comfy_api')]; "
            "print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


# the family key and name a ComfyUI predictor file records for each
COMFYUI_FAMILY = {"flux": "flux", "wan": "wan", "qwen_image": "qwen_image", "sd3": "sd3"}


def _predictor_file(path, transformer, family_key, architecture="mlp_mixer", lora_layers=None):
    """A predictor file as ComfyUI's training writes it for this model (random weights, an even calibration);
    lora_layers: {ComfyUI layer: (in, out)} of LoRA adapters in the last block (random weights)."""
    from dit_token_cache.accel_core.lora import BlockLoRA, LoRASpec
    from dit_token_cache.accel_core.predictor_file import save_predictor
    from dit_token_cache.accel_core.tokencache import CachePredictor, FirstBlockPredictor
    from dit_token_cache.diffusers import FAMILIES as ADAPTERS
    adapter = ADAPTERS[type(transformer).__name__].adapter(transformer)
    torch.manual_seed(3)
    if architecture == "mlp_mixer":
        predictor = CachePredictor(adapter.hidden, adapter.block_count, width=8)
    else:
        block, runner, kind = adapter.predictor_parts()
        predictor = FirstBlockPredictor(block, runner, adapter.hidden, adapter.block_count, kind)
    lora = None
    if lora_layers:
        lora = BlockLoRA(LoRASpec(4, 4.0, (adapter.block_count - 1,), tuple(lora_layers)), lora_layers)
        for parameter in lora.parameters():
            parameter.data.normal_(0.0, 0.05)
    metadata = {"family": family_key, "hidden_size": adapter.hidden, "blocks": adapter.block_count,
                "block_counts": adapter.block_layout(), "token_layout": adapter.token_layout, "training": {},
                "calibration": {"sigmas": [1.0, 0.0], "measured": [1.0, 1.0]}}
    save_predictor(str(path), predictor, metadata, lora)
    return path


def test_an_mlp_mixer_predictor_file_drives_every_family(family, tmp_path):
    """A learned mlp_mixer predictor (which reads only the tokens entering the first block, so a file
    trained in ComfyUI runs in diffusers): its scores decide the P-steps' tokens, not the changes."""
    spec, transformer = family
    scheduler = _scheduler()
    settings = dict(mode="tokencache", i_steps=3, protected_last_blocks=1)
    fallback = apply_token_cache(transformer, scheduler=scheduler, **settings)
    try:
        without = sample(transformer, scheduler, spec=spec)
    finally:
        fallback.remove()
    path = _predictor_file(tmp_path / "p.safetensors", transformer, COMFYUI_FAMILY[spec.name])
    handle = apply_token_cache(transformer, scheduler=scheduler, predictor=path, **settings)
    try:
        got = sample(transformer, scheduler, spec=spec)
        run = handle.run
        assert handle.summary().startswith("TokenCache[learned]") and run.stats.work_fraction < 0.9
        assert run.stats.predictor_flops > 0 and not torch.equal(got, without)
        assert torch.equal(sample(transformer, scheduler, spec=spec), got)
    finally:
        handle.remove()
    layers = LORA_LAYERS.get(spec.name)
    if layers is None:
        return
    path = _predictor_file(tmp_path / "lora.safetensors", transformer, COMFYUI_FAMILY[spec.name], lora_layers=layers)
    handle = apply_token_cache(transformer, scheduler=scheduler, predictor=path, **settings)
    try:
        refined = sample(transformer, scheduler, spec=spec)
        assert handle.summary().startswith("TokenCache[learned+LoRA]") and handle.run.stats.adapter_flops > 0
        assert not torch.equal(refined, got) and (refined - got).norm() < 0.5 * got.norm()
    finally:
        handle.remove()
    assert torch.equal(sample(transformer, scheduler, spec=spec), sample(transformer, scheduler, spec=spec))
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in transformer.modules())


# LoRA adapters of a ComfyUI predictor in the last block, by ComfyUI's layer names and (in, out): Flux's
# fused linear1 (q, k, v and the MLP input) and modulation; Qwen-Image's, named as in diffusers
LORA_LAYERS = {"flux": {"single_blocks.2.linear1": (64, 448), "single_blocks.2.modulation.lin": (64, 192)},
               "qwen_image": {"transformer_blocks.2.img_mlp.net.2": (128, 32), "transformer_blocks.2.attn.to_q": (32, 32)}}


def test_predictor_files_that_cannot_run_here_are_refused_clearly(family, tmp_path):
    spec, transformer = family
    scheduler = _scheduler()
    other = "wan" if spec.name != "wan" else "flux"
    with pytest.raises(ValueError, match=f"trained for family='{other}'.*train a predictor for this model"):
        apply_token_cache(transformer, scheduler=scheduler, mode="tokencache",
                          predictor=_predictor_file(tmp_path / "other.safetensors", transformer, other))
    if spec.name != "flux":
        with pytest.raises(ValueError, match="a first-block predictor .* runs on diffusers' Flux only"):
            apply_token_cache(transformer, scheduler=scheduler, mode="tokencache", predictor=_predictor_file(
                tmp_path / "block.safetensors", transformer, COMFYUI_FAMILY[spec.name], "first_block"))
    if spec.name in ("wan", "sd3"):   # ComfyUI names their layers otherwise than diffusers
        with pytest.raises(ValueError, match="LoRA adapters refine ComfyUI's .* layers, which are not mapped"):
            apply_token_cache(transformer, scheduler=scheduler, mode="tokencache", predictor=_predictor_file(
                tmp_path / "lora.safetensors", transformer, COMFYUI_FAMILY[spec.name], lora_layers={"x": (2, 2)}))
    assert not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in transformer.modules())


def test_flux_plans_text_and_image_tokens_together(transformer):
    """Flux plans cat(text, image) as ComfyUI's Flux does: at a P-step a double block's image
    feed-forward runs on the plan's image tokens, its text feed-forward on the plan's text tokens,
    and a single block's MLP on the whole plan (single blocks run on cat(text, image))."""
    from diffusers.hooks import HookRegistry, ModelHook

    class Tokens(ModelHook):   # registered before the cache's hooks: it sees what the module computes on
        def __init__(self, seen):
            super().__init__()
            self.seen = seen

        def pre_forward(self, module, *args, **kwargs):
            self.seen.append((handle.active_run.plan.step, args[0].shape[1]))
            return args, kwargs
    names = ("transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "single_transformer_blocks.0.proj_mlp")
    seen = {name: [] for name in names}
    for name in names:
        HookRegistry.check_if_exists_or_initialize(transformer.get_submodule(name)).register_hook(
            Tokens(seen[name]), "tokens")
    scheduler = _scheduler()
    handle = apply_token_cache(transformer, scheduler=scheduler, mode="tokencache", i_steps=2, protected_last_blocks=1,
                               cache_ratio=0.4)
    try:
        sample(transformer, scheduler, steps=4, cfg=1.0)
        (plan,) = handle.run.step_plans.values()
        (blocks,) = plan.values()
        image = FAMILIES["flux"].latent[0]
        double, single = blocks[0], blocks[2]
        # step 0 in full; the last call (step 3, a P-step: the I-steps are 0 and 2) with the plan kept
        assert "4 steps: 2 full, 2 conservative" in handle.summary(), handle.summary()
        def at(name, step):   # tokens computed on at each call of the step (none: nothing to recompute)
            return [tokens for s, tokens in seen[name] if s == step]
        assert at(names[0], 0) == [image] * 2 and at(names[1], 0) == [TEXT] * 2 and at(names[2], 0) == [TEXT + image] * 2
        for name, count in ((names[0], int((double >= TEXT).sum())), (names[1], int((double < TEXT).sum())),
                            (names[2], single.numel())):
            assert at(name, 3) == ([count] * 2 if count else []), (name, count, seen[name])
        assert 0 < single.numel() < TEXT + image and 0 < int((double < TEXT).sum()) < TEXT
    finally:
        handle.remove()
        for name in names:
            HookRegistry.check_if_exists_or_initialize(transformer.get_submodule(name)).remove_hook("tokens")
