"""DuCa on the Flux family through ComfyUI's real sampling path."""
import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.sd
import nodes
import tiny_models
from flux_block_checks import Capture, duca, fail_on_fallback, rel_l2, stats_of, two_step_run

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.run import CacheRun
from dit_token_cache.accel_core.schedule import CacheSchedule, StepKind
from dit_token_cache.nodes.adapters.flux import FluxFamilyAdapter
from dit_token_cache.nodes.duca_node import DuCaCacheNode
from dit_token_cache.nodes.patcher import RUN_KEY, SETTINGS_KEY

FAMILY = "flux_dev"
STEPS = 8


@pytest.fixture(scope="module")
def flux(tiny_model):
    return tiny_model(FAMILY)


def sample(model, **kw):
    return tiny_models.sample(model, FAMILY, **{"steps": STEPS, "cfg": 2.0, "seed": 3, **kw})


# -- exactness where nothing is cached ---------------------------------------------

def test_cycle_length_one_is_bit_identical_to_unpatched(flux):
    assert torch.equal(sample(duca(flux, cycle_length=1)), sample(flux))


def test_steps_outside_window_are_bit_identical_to_unpatched(flux):
    patched = duca(flux, cycle_length=3, start_percent=1.0, end_percent=1.0)
    assert torch.equal(sample(patched), sample(flux))
    assert stats_of(patched).counts() == {"full": STEPS, "aggressive": 0, "conservative": 0}


def test_node_returns_patched_clone_and_leaves_input_model_alone(flux):
    (patched,) = DuCaCacheNode.execute(flux, 0.9, 5, "random", 0.0, 1.0, 0).result
    assert patched is not flux
    assert "patches_replace" not in flux.model_options["transformer_options"]
    assert ("double_block", 0) in patched.model_options["transformer_options"]["patches_replace"]["dit"]


# -- the conservative step against an independent computation of the method ------------------

def _inputs(dm, rows=2, txt_len=5, grid=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = dm.hidden_size
    img = torch.randn(rows, grid * grid, hidden, generator=g)
    txt = torch.randn(rows, txt_len, hidden, generator=g)
    ids = torch.zeros(rows, txt_len + grid * grid, 3)
    ids[:, txt_len:, 1] = torch.arange(grid).repeat_interleave(grid).float()
    ids[:, txt_len:, 2] = torch.arange(grid).repeat(grid).float()
    pe = dm.pe_embedder(ids)
    vec_a, vec_b = torch.randn(rows, hidden, generator=g), torch.randn(rows, hidden, generator=g)
    return img, txt, pe, vec_a, vec_b


def test_double_block_full_and_conservative_steps(flux):
    dm = flux.model.diffusion_model
    block = dm.double_blocks[1]
    adapter = FluxFamilyAdapter(dm, "Flux")
    run = two_step_run(cache_ratio=0.7)
    img, txt, pe, vec_a, vec_b = _inputs(dm)
    uuids = ["cond", "uncond"]

    def args(i, t, vec):
        return {"img": i.clone(), "txt": t.clone(), "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": {}}

    # full step: the adapter's own computation equals ComfyUI's block bit for bit
    assert run.begin_forward(1.0, uuids, ("sig",)).kind is StepKind.FULL
    ours = adapter.double_block(run, 1, args(img, txt, vec_a), fail_on_fallback)
    capture = Capture({"img_proj": block.img_attn.proj, "txt_proj": block.txt_attn.proj,
                        "img_mlp": block.img_mlp, "txt_mlp": block.txt_mlp})
    ref_img, ref_txt = block(img=img.clone(), txt=txt.clone(), vec=vec_a, pe=pe, attn_mask=None, transformer_options={})
    capture.close()
    assert torch.equal(ours["img"], ref_img) and torch.equal(ours["txt"], ref_txt)
    run.put_final(torch.zeros(2, 1, 1))
    run.end_forward()

    # conservative step on new inputs and a new timestep vector
    img_b, txt_b = img + 0.3 * torch.randn_like(img), txt + 0.3 * torch.randn_like(txt)
    assert run.begin_forward(0.3, uuids, ("sig",)).kind is StepKind.CONSERVATIVE
    out = adapter.double_block(run, 1, args(img_b, txt_b, vec_b), fail_on_fallback)
    index = run.last_selection[1]
    tokens = txt.shape[1] + img.shape[1]
    assert index.numel() == CacheConfig(cache_ratio=0.7).recompute_count(tokens) > 0

    img_mod1, img_mod2 = block.img_mod(vec_b)
    txt_mod1, txt_mod2 = block.txt_mod(vec_b)

    def reference(x, attn_out, mlp_cached, picked, norm2, mlp, mod1, mod2):
        x = x + mod1.gate * attn_out                       # cached attention, current gate
        mlp_out = mlp_cached.clone()
        mlp_out[:, picked] = mlp(torch.addcmul(mod2.shift, norm2(x[:, picked]), 1 + mod2.scale))
        return x + mod2.gate * mlp_out, mlp_out

    txt_len = txt.shape[1]
    img_pick, txt_pick = index[index >= txt_len] - txt_len, index[index < txt_len]
    exp_img, img_mlp_new = reference(img_b, capture.out["img_proj"], capture.out["img_mlp"], img_pick,
                                     block.img_norm2, block.img_mlp, img_mod1, img_mod2)
    exp_txt, _ = reference(txt_b, capture.out["txt_proj"], capture.out["txt_mlp"], txt_pick,
                           block.txt_norm2, block.txt_mlp, txt_mod1, txt_mod2)
    torch.testing.assert_close(out["img"], exp_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["txt"], exp_txt, rtol=1e-5, atol=1e-5)

    # exactly the selected tokens got new MLP values; the others kept the cache
    stored = run.get(1, "img_mlp", torch.device("cpu"))
    changed = (stored - capture.out["img_mlp"]).abs().amax(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == img_pick.tolist()
    torch.testing.assert_close(stored, img_mlp_new, rtol=1e-5, atol=1e-5)
    # and it is not a full recomputation in disguise
    full_b, _ = block(img=img_b.clone(), txt=txt_b.clone(), vec=vec_b, pe=pe, attn_mask=None, transformer_options={})
    assert not torch.allclose(out["img"], full_b, atol=1e-3)
    run.end_forward()


AT = 0.45   # the conservative step's sigma


@pytest.mark.parametrize("forecast, full_sigmas", [("linear", (0.8, 0.6)), ("quadratic", (0.8, 0.7, 0.55))])
def test_double_block_conservative_step_with_forecasting(flux, forecast, full_sigmas):
    """Full steps at uneven sigmas, then a conservative step: the cached
    attention output and the MLP output of every unselected token are the
    polynomial through their recorded values (taken from ComfyUI's own block
    with forward hooks), evaluated at the new sigma (within one full-step
    spacing of the last, where the trend is followed); selected tokens compute."""
    dm = flux.model.diffusion_model
    block = dm.double_blocks[1]
    adapter = FluxFamilyAdapter(dm, "Flux")
    sigmas = [*full_sigmas, AT, 0.0]
    run = CacheRun(CacheConfig(cycle_length=len(sigmas) - 1, mode="toca", cache_ratio=0.7, seed=5, forecast=forecast),
                   sigmas, 1.0, 0.0)
    run.schedule.kinds = [StepKind.FULL] * len(full_sigmas) + [StepKind.CONSERVATIVE]
    img, txt, pe, _, vec = _inputs(dm)
    g = torch.Generator().manual_seed(7)
    uuids = ["cond", "uncond"]

    def args(i, t, v):
        return {"img": i.clone(), "txt": t.clone(), "vec": v, "pe": pe, "attn_mask": None, "transformer_options": {}}

    recorded = []
    for sigma in full_sigmas:
        step_img, step_txt = img + sigma * torch.randn(img.shape, generator=g), txt + sigma * torch.randn(txt.shape, generator=g)
        step_vec = vec + sigma * torch.randn(vec.shape, generator=g)
        assert run.begin_forward(sigma, uuids, ("sig",)).kind is StepKind.FULL
        adapter.double_block(run, 1, args(step_img, step_txt, step_vec), fail_on_fallback)
        capture = Capture({"img_proj": block.img_attn.proj, "img_mlp": block.img_mlp})
        block(img=step_img.clone(), txt=step_txt.clone(), vec=step_vec, pe=pe, attn_mask=None, transformer_options={})
        capture.close()
        recorded.append(capture.out)
        run.put_final(torch.zeros(2, 1, 1))
        run.end_forward()

    def polynomial(values, at):
        """The polynomial through (full_sigmas[k], values[k]) at `at`, by Lagrange's formula."""
        total = 0
        for k, (s_k, v_k) in enumerate(zip(full_sigmas, values)):
            weight = 1.0
            for j, s_j in enumerate(full_sigmas):
                if j != k:
                    weight *= (at - s_j) / (s_k - s_j)
            total = total + weight * v_k
        return total

    assert run.begin_forward(AT, uuids, ("sig",)).kind is StepKind.CONSERVATIVE
    out = adapter.double_block(run, 1, args(img, txt, vec), fail_on_fallback)
    index = run.last_selection[1]
    pick = index[index >= txt.shape[1]] - txt.shape[1]
    img_mod1, img_mod2 = block.img_mod(vec)
    x = img + img_mod1.gate * polynomial([r["img_proj"] for r in recorded], AT)
    mlp_out = polynomial([r["img_mlp"] for r in recorded], AT)
    mlp_out[:, pick] = block.img_mlp(torch.addcmul(img_mod2.shift, block.img_norm2(x[:, pick]), 1 + img_mod2.scale))
    torch.testing.assert_close(out["img"], x + img_mod2.gate * mlp_out, rtol=1e-4, atol=1e-4)
    # and it is not reuse in disguise
    reused = img + img_mod1.gate * recorded[-1]["img_proj"]
    assert not torch.allclose(out["img"], reused + img_mod2.gate * recorded[-1]["img_mlp"], atol=1e-3)
    run.end_forward()


def test_single_block_full_and_conservative_steps(flux):
    dm = flux.model.diffusion_model
    block = dm.single_blocks[0]
    adapter = FluxFamilyAdapter(dm, "Flux")
    run = two_step_run(cache_ratio=0.6)
    img, txt, pe, vec_a, vec_b = _inputs(dm, seed=1)
    x = torch.cat((txt, img), dim=1)
    uuids = ["cond", "uncond"]
    block_id = len(dm.double_blocks)

    def args(v, vec):
        return {"img": v.clone(), "vec": vec, "pe": pe, "attn_mask": None, "transformer_options": {}}

    run.begin_forward(1.0, uuids, ("sig",))
    ours = adapter.single_block(run, 0, args(x, vec_a), fail_on_fallback)
    capture = Capture({"linear2": block.linear2})
    ref = block(x.clone(), vec=vec_a, pe=pe, attn_mask=None, transformer_options={})
    capture.close()
    assert torch.equal(ours["img"], ref)
    run.put_final(torch.zeros(2, 1, 1))
    run.end_forward()

    x_b = x + 0.3 * torch.randn_like(x)
    assert run.begin_forward(0.3, uuids, ("sig",)).kind is StepKind.CONSERVATIVE
    out = adapter.single_block(run, 0, args(x_b, vec_b), fail_on_fallback)
    pick = run.last_selection[block_id]
    assert pick.numel() == CacheConfig(cache_ratio=0.6).recompute_count(x.shape[1]) > 0

    mod = block.modulation(vec_b)[0]
    hidden = block.hidden_size
    attn_a = capture.inp["linear2"][..., :hidden]
    out_cached = capture.out["linear2"].clone()
    mlp = block.linear1(torch.addcmul(mod.shift, block.pre_norm(x_b[:, pick]), 1 + mod.scale))[..., 3 * hidden:]
    out_cached[:, pick] = block.linear2(torch.cat((attn_a[:, pick], block.mlp_act(mlp)), dim=2))
    torch.testing.assert_close(out["img"], x_b + mod.gate * out_cached, rtol=1e-5, atol=1e-5)
    full_b = block(x_b.clone(), vec=vec_b, pe=pe, attn_mask=None, transformer_options={})
    assert not torch.allclose(out["img"], full_b, atol=1e-3)
    run.end_forward()


# -- whole runs --------------------------------------------------------------------------

def test_work_accounting_matches_schedule(flux):
    patched = duca(flux, cycle_length=4, cache_ratio=0.75)
    out = sample(patched, steps=10)
    stats = stats_of(patched)
    assert stats.counts() == {"full": 3, "aggressive": 5, "conservative": 2}   # F A C A F A C A F A
    tokens = 16 + 16                                                      # 64x64 -> 4x4 patches, 16 text tokens
    picked = CacheConfig(cache_ratio=0.75).recompute_count(tokens)
    assert stats.token_fraction == pytest.approx((3 * tokens + 2 * picked) / (10 * tokens))
    assert stats.evaluations == 10                                        # cond and uncond batched
    assert 0.2 < stats.work_fraction < 0.5 and stats.theoretical_speedup == pytest.approx(1 / stats.work_fraction)
    assert stats.peak_cache_bytes > 0
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("settings", [
    {"mode": "duca"}, {"mode": "toca"}, {"mode": "fora"},
    {"selector": "v_norm"}, {"selector": "k_norm"}, {"selector": "similarity"}, {"selector": "attention"},
    {"cache_device": "cpu"},
])
def test_each_mode_and_selector_is_deterministic_and_close_to_uncached(flux, settings):
    base = sample(flux)
    first = sample(duca(flux, cycle_length=3, **settings))
    again = sample(duca(flux, cycle_length=3, **settings))
    assert torch.equal(first, again)
    assert not torch.equal(first, base)
    assert rel_l2(first, base) < 0.5


def test_selector_seed_changes_random_selection_only(flux):
    a = sample(duca(flux, cycle_length=3, mode="toca", seed=1))
    b = sample(duca(flux, cycle_length=3, mode="toca", seed=2))
    assert not torch.equal(a, b)
    c = sample(duca(flux, cycle_length=3, mode="fora", seed=1))
    d = sample(duca(flux, cycle_length=3, mode="fora", seed=2))
    assert torch.equal(c, d)   # FORA selects no tokens


def test_cfg_batched_and_split_give_the_same_result(flux):
    patched = duca(flux, cycle_length=3)
    batched = sample(patched)
    batched_stats = stats_of(patched)
    base_model = patched.model
    usual = base_model.memory_usage_factor
    base_model.memory_usage_factor = 1e15      # nothing fits: ComfyUI runs cond and uncond one at a time
    try:
        split = sample(patched)
    finally:
        base_model.memory_usage_factor = usual
    split_stats = stats_of(patched)
    assert split_stats.evaluations == 2 * batched_stats.evaluations
    assert split_stats.counts() == batched_stats.counts()
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("settings", [{"forecast": "linear"}, {"forecast": "quadratic", "mode": "toca"},
                                      {"forecast": "linear", "max_error": 0.05}])
def test_forecast_and_error_aware_runs_are_deterministic_batched_and_split(flux, settings):
    """Same seed, same image run to run; the error-aware schedule decides from
    the first cond of each step, so split CFG runs the same steps as batched."""
    steps = 12
    patched = duca(flux, cycle_length=4, **settings)
    batched = sample(patched, steps=steps)
    batched_stats = stats_of(patched)
    assert torch.equal(batched, sample(patched, steps=steps))
    base_model = patched.model
    usual = base_model.memory_usage_factor
    base_model.memory_usage_factor = 1e15      # nothing fits: ComfyUI runs cond and uncond one at a time
    try:
        split = sample(patched, steps=steps)
    finally:
        base_model.memory_usage_factor = usual
    split_stats = stats_of(patched)
    assert split_stats.evaluations == 2 * batched_stats.evaluations
    assert split_stats.step_kinds == batched_stats.step_kinds
    assert split_stats.step_errors == pytest.approx(batched_stats.step_errors, rel=1e-4)
    torch.testing.assert_close(split, batched, rtol=1e-4, atol=1e-4)
    assert batched_stats.step_errors and all(0 < e < 1 for e in batched_stats.step_errors.values())


def test_error_aware_schedule_adds_full_steps_when_the_error_is_high_and_saves_them_when_low(flux):
    fixed = duca(flux, cycle_length=4, forecast="linear")
    sample(fixed, steps=12)
    errors = stats_of(fixed).step_errors.values()
    tight = duca(flux, cycle_length=4, forecast="linear", max_error=min(errors) / 2)
    loose = duca(flux, cycle_length=4, forecast="linear", max_error=4 * max(errors))
    sample(tight, steps=12)
    sample(loose, steps=12)
    full = {name: stats_of(m).counts()["full"] for name, m in (("fixed", fixed), ("tight", tight), ("loose", loose))}
    assert full["tight"] > full["fixed"] > full["loose"], full
    assert stats_of(tight).full_steps_added > 0 and stats_of(loose).full_steps_saved > 0
    assert "by error" in stats_of(tight).summary("DuCa")


def test_conds_of_different_length_run_split(flux):
    positive, negative = tiny_models.conditioning(FAMILY, flux, tokens=16, neg_tokens=7)
    patched = duca(flux, cycle_length=3)
    out = sample(patched, positive=positive, negative=negative)
    stats = stats_of(patched)
    assert stats.evaluations == 2 * STEPS
    assert stats.counts()["conservative"] > 0
    assert torch.equal(out, sample(duca(flux, cycle_length=3), positive=positive, negative=negative))


def test_resolution_and_batch_changes_between_runs(flux):
    patched = duca(flux, cycle_length=3)
    cases = [dict(width=64, height=64), dict(width=96, height=64),
             dict(latent=tiny_models.empty_latent(FAMILY, 64, 64, batch=2))]
    for case in cases:
        assert torch.equal(sample(patched, **case), sample(duca(flux, cycle_length=3), **case))


def test_exception_mid_run_leaves_no_state_behind(flux):
    patched = duca(flux, cycle_length=3)
    positive, negative = tiny_models.conditioning(FAMILY, flux)
    latent = tiny_models.empty_latent(FAMILY, 64, 64)["samples"]
    noise = comfy.sample.prepare_noise(latent, 3)

    def interrupt(step, x0, x, total_steps):
        if step == 4:
            raise comfy.model_management.InterruptProcessingException()

    with pytest.raises(comfy.model_management.InterruptProcessingException):
        comfy.sample.sample(patched, noise, STEPS, 2.0, "euler", "simple", positive, negative, latent,
                            callback=interrupt, seed=3)
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    assert RUN_KEY not in patched.model_options["transformer_options"]
    assert settings.last_run.store.nbytes == 0
    assert torch.equal(sample(patched), sample(duca(flux, cycle_length=3)))


def test_two_samplers_sharing_one_patched_model(flux):
    shared = duca(flux, cycle_length=3)
    first, second = sample(shared, seed=1), sample(shared, seed=2)
    assert torch.equal(first, sample(duca(flux, cycle_length=3), seed=1))
    assert torch.equal(second, sample(duca(flux, cycle_length=3), seed=2))


def _schedule_kinds(patched, sigmas):
    config = patched.model_options["transformer_options"][SETTINGS_KEY].config
    return [k.value for k in CacheSchedule(config, sigmas, 1.0, 0.0).kinds]


def test_heun_two_evaluations_per_step_keep_the_schedule(flux):
    patched = duca(flux, cycle_length=3)
    out = sample(patched, sampler="heun", steps=6)
    stats = stats_of(patched)
    assert sorted(stats.step_kinds) == list(range(6))
    assert stats.evaluations == 11                 # heun: 2 per step, 1 on the last
    sigmas = [float(s) for s in comfy.samplers.calculate_sigmas(patched.model.model_sampling, "simple", 6)]
    assert [stats.step_kinds[i].value for i in range(6)] == _schedule_kinds(patched, sigmas)
    assert torch.isfinite(out).all()


def test_denoise_and_partial_step_ranges_start_with_a_full_step(flux):
    patched = duca(flux, cycle_length=3)
    sample(patched, steps=10, denoise=0.6)
    stats = stats_of(patched)
    assert len(stats.step_kinds) == 10 and stats.step_kinds[0] is StepKind.FULL
    assert stats.counts() == {"full": 4, "aggressive": 3, "conservative": 3}

    positive, negative = tiny_models.conditioning(FAMILY, flux)
    latent = tiny_models.empty_latent(FAMILY, 64, 64)
    nodes.common_ksampler(patched, 3, 10, 2.0, "euler", "simple", positive, negative, latent, start_step=4, last_step=9)
    stats = stats_of(patched)
    assert len(stats.step_kinds) == 5 and stats.step_kinds[0] is StepKind.FULL


def _tiny_lora(dm, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for name in ("double_blocks.0.img_mlp.0", "double_blocks.1.img_attn.qkv", "single_blocks.0.linear1", "single_blocks.1.linear2"):
        weight = dm.get_submodule(name).weight
        lora[f"diffusion_model.{name}.lora_up.weight"] = 0.05 * torch.randn(weight.shape[0], rank, generator=g)
        lora[f"diffusion_model.{name}.lora_down.weight"] = 0.05 * torch.randn(rank, weight.shape[1], generator=g)
    return lora


def test_lora_applies_under_caching_in_either_order(flux):
    lora = _tiny_lora(flux.model.diffusion_model)
    with_lora, _ = comfy.sd.load_lora_for_models(flux, None, lora, 1.0, 0)
    lora_then_duca = sample(duca(with_lora, cycle_length=3))
    duca_then_lora = sample(comfy.sd.load_lora_for_models(duca(flux, cycle_length=3), None, lora, 1.0, 0)[0])
    assert torch.equal(lora_then_duca, duca_then_lora)
    assert not torch.allclose(lora_then_duca, sample(duca(flux, cycle_length=3)), atol=1e-4)
    assert torch.equal(sample(duca(with_lora, cycle_length=1)), sample(with_lora))


@pytest.mark.parametrize("bad", [
    dict(cache_ratio=1.5), dict(cycle_length=0), dict(selector="best"), dict(start_percent=0.9, end_percent=0.1),
])
def test_node_rejects_bad_input_with_a_clear_message(flux, bad):
    values = dict(cache_ratio=0.9, cycle_length=5, selector="random", start_percent=0.0, end_percent=1.0, seed=0)
    values.update(bad)
    with pytest.raises(ValueError, match="accepted|start must be"):
        DuCaCacheNode.execute(flux, **values)


def test_per_token_modulation_of_unknown_layout_falls_back_to_full_compute_and_says_so_once(flux, caplog):
    """Modulation rows with no modulation_dims (nor reference tokens) to say
    which tokens use which, or dims that leave a token out: full compute.
    Known layouts are cached (tests/test_flux_kontext.py)."""
    dm = flux.model.diffusion_model
    adapter = FluxFamilyAdapter(dm, "Flux")
    run = two_step_run(cache_ratio=0.7)
    img, txt, pe, vec_a, vec_b = _inputs(dm)
    calls = []

    def original(args):
        calls.append(args)
        return {"img": args["img"], "txt": args["txt"]}

    run.begin_forward(1.0, ["cond", "uncond"], ("sig",))
    two_rows = torch.stack((vec_a, vec_b), dim=1)
    leaves_last_token_out = [(0, img.shape[1] - 1, 0)]
    for vec, dims in ((two_rows, None), (two_rows, None), (vec_a, leaves_last_token_out)):
        args = {"img": img, "txt": txt, "vec": vec, "pe": pe, "attention_mask": None,
                "modulation_dims_img": dims, "modulation_dims_txt": None, "transformer_options": {}}
        with caplog.at_level("WARNING"):
            adapter.double_block(run, 0, args, original)
    assert len(calls) == 3
    assert len([n for n in run.stats.notes if "per-token modulation" in n]) == 1
    assert sum("per-token modulation" in r.getMessage() for r in caplog.records) == 1
    assert run.stats.token_fraction == 1.0


def test_block_replaced_by_another_node_keeps_that_patch(flux):
    calls = []

    def other_nodes_patch(args, extra):
        calls.append(args["img"].shape)
        out = extra["original_block"](args)
        return {"img": out["img"] * 1.01, "txt": out["txt"]}

    patched_elsewhere = flux.clone()
    patched_elsewhere.set_model_patch_replace(other_nodes_patch, "dit", "double_block", 0)
    reference = sample(patched_elsewhere)
    calls.clear()
    assert torch.equal(sample(duca(patched_elsewhere, cycle_length=1)), reference)
    assert len(calls) == STEPS

    calls.clear()
    cached = duca(patched_elsewhere, cycle_length=3)
    sample(cached)
    stats = stats_of(cached)
    assert len(calls) == stats.counts()["full"] + stats.counts()["conservative"]   # skipped only when nothing computes
    assert any("block replacement from another node" in note for note in stats.notes)
