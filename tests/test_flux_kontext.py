"""Per-token modulation in the Flux family: Flux 2 reference images at timestep
zero ("index_timestep_zero", set the way the ReferenceLatent and
FluxKontextMultiReferenceLatentMethod nodes set it) and HunyuanVideo
image-to-video (guiding frame) are cached like plain Flux, not computed in full.

Flux.1's per-block modulation cannot run "index_timestep_zero" in ComfyUI
itself (the doubled timestep batch does not broadcast in apply_mod), so the
Flux checkpoint here is a tiny Flux 2."""
import pytest
import torch

import comfy.sample
import tiny_models
from flux_block_checks import Capture, duca, fail_on_fallback, rel_l2, stats_of, two_step_run
from comfy.ldm.flux.model import invert_slices
from comfy_extras.nodes_edit_model import ReferenceLatent
from comfy_extras.nodes_flux import FluxKontextMultiReferenceLatentMethod

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.schedule import StepKind
from dit_token_cache.nodes.adapters.flux import FluxFamilyAdapter

FAMILY = "flux2"
STEPS = 6
REFERENCE_SHAPE = (1, 128, 4, 4)     # 16 reference tokens next to the 16 tokens of a 64x64 image


@pytest.fixture(scope="module")
def flux2(tiny_model):
    return tiny_model(FAMILY)


@pytest.fixture(scope="module")
def kontext(flux2):
    """(positive, negative), each with one reference latent at timestep zero."""
    reference = {"samples": torch.randn(REFERENCE_SHAPE, generator=torch.Generator().manual_seed(7))}
    conds = []
    for cond in tiny_models.conditioning(FAMILY, flux2):
        (cond,) = ReferenceLatent.execute(cond, reference)
        (cond,) = FluxKontextMultiReferenceLatentMethod.execute(cond, "index_timestep_zero")
        conds.append(cond)
    return tuple(conds)


def run_sampler(model, family, positive, negative, cfg, steps=STEPS, width=64, height=64, frames=None):
    """ComfyUI's KSampler path; returns the output latent and the first step's denoised prediction."""
    latent = tiny_models.empty_latent(family, width, height, frames=frames)["samples"]
    noise = comfy.sample.prepare_noise(latent, 3)
    denoised = {}

    def keep_first(step, x0, x, total_steps):
        denoised.setdefault(step, x0.clone())

    out = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", positive, negative, latent,
                              callback=keep_first, disable_pbar=True, seed=3)
    return out, denoised[0]


def sample_kontext(model, kontext, **kw):
    return run_sampler(model, FAMILY, *kontext, cfg=2.0, **kw)


# -- whole runs ------------------------------------------------------------------------

def test_reference_tokens_reach_the_blocks_at_timestep_zero(flux2, kontext):
    seen = []

    def spy(args, extra):
        seen.append((args["vec"][0][0].shift.shape[1], args["transformer_options"]["reference_image_num_tokens"]))
        return extra["original_block"](args)

    spied = flux2.clone()
    spied.set_model_patch_replace(spy, "dit", "double_block", 0)
    sample_kontext(spied, kontext, steps=1)
    assert seen == [(2, [16])]     # rows: current t and t = 0; batched cond and uncond


def test_cycle_length_one_is_bit_identical_to_unpatched(flux2, kontext):
    assert torch.equal(sample_kontext(duca(flux2, cycle_length=1), kontext)[0], sample_kontext(flux2, kontext)[0])


def test_duca_caches_reference_images_at_timestep_zero(flux2, kontext):
    base, base_first = sample_kontext(flux2, kontext)
    patched = duca(flux2, cycle_length=3, cache_ratio=0.5)
    out, first = sample_kontext(patched, kontext)
    stats = stats_of(patched)
    assert stats.notes == []
    assert stats.counts() == {"full": 2, "aggressive": 2, "conservative": 2}
    assert 0.0 < stats.token_fraction < 1.0
    # the first step fills the cache through the rebuilt blocks: bit-identical to ComfyUI's
    assert torch.equal(first, base_first)
    assert torch.equal(out, sample_kontext(duca(flux2, cycle_length=3, cache_ratio=0.5), kontext)[0])
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    print(f"flux2 kontext (index_timestep_zero): rel L2 vs uncached {rel_l2(out, base):.4f}")
    assert rel_l2(out, base) < 0.5


def test_hunyuan_video_guiding_frame_is_cached(tiny_model):
    """HunyuanVideo i2v "v2 (replace)": the guiding frame's tokens take another
    modulation row, passed to the blocks as modulation_dims."""
    family = "hunyuan_video"
    model = tiny_model(family)
    positive, negative = tiny_models.conditioning(family, model)
    positive = [[positive[0][0], {**positive[0][1], "guiding_frame_index": 0}]]

    def sample(m):
        return run_sampler(m, family, positive, negative, cfg=1.0, width=32, height=32, frames=5)

    dims = []
    spied = model.clone()
    spied.set_model_patch_replace(lambda args, extra: dims.append(args["modulation_dims_img"]) or extra["original_block"](args),
                                  "dit", "double_block", 0)
    run_sampler(spied, family, positive, negative, cfg=1.0, steps=1, width=32, height=32, frames=5)
    assert dims == [[(0, 4, 0), (4, None, 1)]]     # the first latent frame's 2x2 patches take row 0

    base, base_first = sample(model)
    assert torch.equal(sample(duca(model, cycle_length=1))[0], base)
    patched = duca(model, cycle_length=3, cache_ratio=0.5)
    out, first = sample(patched)
    stats = stats_of(patched)
    assert stats.notes == [] and 0.0 < stats.token_fraction < 1.0
    assert stats.counts() == {"full": 2, "aggressive": 2, "conservative": 2}
    assert torch.equal(first, base_first)
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    print(f"hunyuan_video i2v (guiding frame): rel L2 vs uncached {rel_l2(out, base):.4f}")
    assert rel_l2(out, base) < 0.5


# -- the conservative step against an independent computation, per-token modulation ----------

TXT, IMG, REFS = 5, 12, 6     # the last REFS image tokens are a reference image


def _inputs(dm, rows=2, seed=0):
    """Hidden states, rope and the two-row modulation vectors (current t, t = 0)
    the way forward_orig builds them for index_timestep_zero."""
    g = torch.Generator().manual_seed(seed)
    hidden = dm.hidden_size
    img = torch.randn(rows, IMG, hidden, generator=g)
    txt = torch.randn(rows, TXT, hidden, generator=g)
    ids = torch.zeros(rows, TXT + IMG, 4)
    ids[:, TXT:, 1] = torch.arange(IMG).float()
    ids[:, TXT + IMG - REFS:, 0] = 10.0
    pe = dm.pe_embedder(ids)
    vecs = [torch.randn(rows, 2, hidden, generator=g) for _ in range(2)]
    return img, txt, pe, vecs


def _comfy_dims(offset=0):
    """modulation_dims as forward_orig builds them from timestep_zero_index."""
    zero = [[IMG - REFS, IMG]]
    dims = [(s[0], s[1], 0) for s in invert_slices(zero, IMG)] + [(s[0], s[1], 1) for s in zero]
    return [(0 if a == 0 else a + offset, b + offset, row) for a, b, row in dims]


def _per_token(values, tokens):
    """[B, 2, D] -> [B, tokens, D]: row 1 for the reference tokens (the last REFS), row 0 before."""
    is_reference = (torch.arange(tokens) >= tokens - REFS)[None, :, None]
    return torch.where(is_reference, values[:, 1:2], values[:, 0:1])


def _options():
    return {"reference_image_num_tokens": [REFS]}


def test_double_block_full_and_conservative_steps(flux2):
    dm = flux2.model.diffusion_model
    block = dm.double_blocks[1]
    adapter = FluxFamilyAdapter(dm, "Flux")
    run = two_step_run(cache_ratio=0.5)
    img, txt, pe, (orig_a, orig_b) = _inputs(dm)
    uuids = ["cond", "uncond"]

    def vec(vec_orig):
        return dm.double_stream_modulation_img(vec_orig), dm.double_stream_modulation_txt(vec_orig[:, 0])

    def args(i, t, v):
        return {"img": i.clone(), "txt": t.clone(), "vec": v, "pe": pe, "attn_mask": None, "transformer_options": _options()}

    # full step that fills the cache: bit for bit ComfyUI's block with modulation_dims_img
    assert run.begin_forward(1.0, uuids, ("sig",)).kind is StepKind.FULL
    ours = adapter.double_block(run, 1, args(img, txt, vec(orig_a)), fail_on_fallback)
    capture = Capture({"img_proj": block.img_attn.proj, "txt_proj": block.txt_attn.proj,
                        "img_mlp": block.img_mlp, "txt_mlp": block.txt_mlp})
    ref_img, ref_txt = block(img=img.clone(), txt=txt.clone(), vec=vec(orig_a), pe=pe, attn_mask=None,
                             modulation_dims_img=_comfy_dims(), transformer_options={})
    capture.close()
    assert torch.equal(ours["img"], ref_img) and torch.equal(ours["txt"], ref_txt)
    run.put_final(torch.zeros(2, 1, 1))
    run.end_forward()

    img_b, txt_b = img + 0.3 * torch.randn_like(img), txt + 0.3 * torch.randn_like(txt)
    assert run.begin_forward(0.3, uuids, ("sig",)).kind is StepKind.CONSERVATIVE
    out = adapter.double_block(run, 1, args(img_b, txt_b, vec(orig_b)), fail_on_fallback)
    index = run.last_selection[1]
    assert index.numel() == CacheConfig(cache_ratio=0.5).recompute_count(TXT + IMG) > 0
    img_pick, txt_pick = index[index >= TXT] - TXT, index[index < TXT]
    # the selection mixes reference and other image tokens: both rows are gathered
    assert (img_pick >= IMG - REFS).any() and (img_pick < IMG - REFS).any()

    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec(orig_b)

    def reference(x, attn_out, mlp_cached, picked, norm2, mlp, mod1, mod2, per_token):
        shift2, scale2 = per_token(mod2.shift), per_token(mod2.scale)
        x = x + per_token(mod1.gate) * attn_out           # cached attention, current gate of each token
        mlp_out = mlp_cached.clone()
        mlp_out[:, picked] = mlp(norm2(x[:, picked]) * (1 + scale2[:, picked]) + shift2[:, picked])
        return x + per_token(mod2.gate) * mlp_out

    exp_img = reference(img_b, capture.out["img_proj"], capture.out["img_mlp"], img_pick, block.img_norm2,
                        block.img_mlp, img_mod1, img_mod2, lambda v: _per_token(v, IMG))
    exp_txt = reference(txt_b, capture.out["txt_proj"], capture.out["txt_mlp"], txt_pick, block.txt_norm2,
                        block.txt_mlp, txt_mod1, txt_mod2, lambda v: v.expand(-1, TXT, -1))
    torch.testing.assert_close(out["img"], exp_img, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["txt"], exp_txt, rtol=1e-5, atol=1e-5)
    full_b, _ = block(img=img_b.clone(), txt=txt_b.clone(), vec=vec(orig_b), pe=pe, attn_mask=None,
                      modulation_dims_img=_comfy_dims(), transformer_options={})
    assert not torch.allclose(out["img"], full_b, atol=1e-3)
    run.end_forward()


def test_single_block_full_and_conservative_steps(flux2):
    dm = flux2.model.diffusion_model
    block = dm.single_blocks[0]
    adapter = FluxFamilyAdapter(dm, "Flux")
    run = two_step_run(cache_ratio=0.5)
    img, txt, pe, (orig_a, orig_b) = _inputs(dm, seed=1)
    x = torch.cat((txt, img), dim=1)
    tokens = TXT + IMG
    uuids = ["cond", "uncond"]
    block_id = len(dm.double_blocks)

    def args(v, vec_orig):
        return {"img": v.clone(), "vec": dm.single_stream_modulation(vec_orig)[0], "pe": pe, "attn_mask": None,
                "transformer_options": _options()}

    run.begin_forward(1.0, uuids, ("sig",))
    ours = adapter.single_block(run, 0, args(x, orig_a), fail_on_fallback)
    capture = Capture({"linear2": block.linear2})
    ref = block(x.clone(), vec=dm.single_stream_modulation(orig_a)[0], pe=pe, attn_mask=None,
                modulation_dims=_comfy_dims(offset=TXT), transformer_options={})
    capture.close()
    assert torch.equal(ours["img"], ref)
    run.put_final(torch.zeros(2, 1, 1))
    run.end_forward()

    x_b = x + 0.3 * torch.randn_like(x)
    assert run.begin_forward(0.3, uuids, ("sig",)).kind is StepKind.CONSERVATIVE
    out = adapter.single_block(run, 0, args(x_b, orig_b), fail_on_fallback)
    pick = run.last_selection[block_id]
    assert pick.numel() == CacheConfig(cache_ratio=0.5).recompute_count(tokens) > 0
    assert (pick >= tokens - REFS).any() and (pick < tokens - REFS).any()

    mod = dm.single_stream_modulation(orig_b)[0]
    shift, scale, gate = (_per_token(v, tokens) for v in (mod.shift, mod.scale, mod.gate))
    hidden = block.hidden_size
    attn_a = capture.inp["linear2"][..., :hidden]
    out_cached = capture.out["linear2"].clone()
    mlp = block.linear1(block.pre_norm(x_b[:, pick]) * (1 + scale[:, pick]) + shift[:, pick])[..., 3 * hidden:]
    out_cached[:, pick] = block.linear2(torch.cat((attn_a[:, pick], block.mlp_act(mlp)), dim=2))
    torch.testing.assert_close(out["img"], x_b + gate * out_cached, rtol=1e-5, atol=1e-5)
    full_b = block(x_b.clone(), vec=mod, pe=pe, attn_mask=None, modulation_dims=_comfy_dims(offset=TXT),
                   transformer_options={})
    assert not torch.allclose(out["img"], full_b, atol=1e-3)
    run.end_forward()
