"""SD3's conservative step is the one family step not made of the blocks' own
forward: the joint attention is a function call, so the adapter runs each half
of a JointBlock through its post_attention with the attention's cached output.
Checked here against a reference built from the DismantledBlocks' own methods
(pre_attention on every token, ComfyUI's gate_cat and modulate, the MLP's own
forward), from what the full step before it computed."""
import pytest
import torch

import tiny_models
from comfy.ldm.modules.diffusionmodules.mmdit import gate_cat, modulate

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.schedule import StepKind
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache


def _reference_half(half, x, c, full, index):
    """The half's output at a conservative step: this step's modulation on its current
    input, the full step's projected attention, its MLP output with the selected rows
    recomputed from the current input."""
    if half.x_block_self_attn:
        *_, (_, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2) = half.pre_attention_x(x, c)
        attended = gate_cat(x, gate_msa, gate_msa2, full["attn.proj"], full["attn2.proj"])
    else:
        _, (_, gate_msa, shift_mlp, scale_mlp, gate_mlp) = half.pre_attention(x, c)
        attended = x + gate_msa.unsqueeze(1) * full["attn.proj"]
    fresh = type(half.mlp).forward(half.mlp, modulate(half.norm2(attended), shift_mlp, scale_mlp))
    mlp = full["mlp"].clone()
    mlp[:, index] = fresh[:, index]
    return attended + gate_mlp.unsqueeze(1) * mlp


@pytest.mark.parametrize("family", ["sd3", "sd35_medium"])
def test_conservative_joint_block_matches_a_reference_from_its_halves(family, tiny_model):
    model = tiny_model(family)
    patched = apply_token_cache(model, CacheConfig(mode="toca", cycle_length=3, cache_ratio=0.75))
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    blocks = model.model.diffusion_model.joint_blocks
    full = {}                 # (block, half) -> module name -> output at the last full step
    checked, qkv_tokens = [], []
    in_reference = [False]   # the reference's own pre_attention runs qkv on every token

    def plan():
        run = settings.active_run
        return None if run is None else run.plan

    def record(block_id, half_name, name, module, args, output):
        if plan() is not None and plan().kind is StepKind.FULL:
            full.setdefault((block_id, half_name), {})[name] = output.clone()

    def check(block_id, block, module, args, kwargs, output):
        if plan() is None or plan().kind is not StepKind.CONSERVATIVE or (block_id, "x_block") not in full:
            return
        context, x = args
        c = kwargs["c"]
        selection = settings.active_run.last_selection
        in_reference[0] = True
        expected_x = _reference_half(block.x_block, x, c, full.pop((block_id, "x_block")), selection[block_id])
        torch.testing.assert_close(output[1], expected_x, rtol=1e-4, atol=1e-5)
        if block.context_block.pre_only:
            assert output[0] is None
        else:
            expected_context = _reference_half(block.context_block, context, c, full.pop((block_id, "context_block")),
                                               selection[(block_id, 1)])
            torch.testing.assert_close(output[0], expected_context, rtol=1e-4, atol=1e-5)
        in_reference[0] = False
        checked.append(block_id)

    def count_qkv(module, args, output):
        if plan() is not None and plan().kind is StepKind.CONSERVATIVE and not in_reference[0]:
            qkv_tokens.append(args[0].shape[1])

    handles = []
    for block_id, block in enumerate(blocks):
        handles.append(block.register_forward_hook(
            lambda m, a, k, o, block_id=block_id, block=block: check(block_id, block, m, a, k, o), with_kwargs=True))
        for half_name in ("x_block", "context_block"):
            half = getattr(block, half_name)
            for name in ("attn.proj", "attn2.proj", "mlp"):
                try:
                    module = half.get_submodule(name)
                except AttributeError:   # pre-only text half; attn2 in SD3.5 Medium only
                    continue
                handles.append(module.register_forward_hook(
                    lambda m, a, o, b=block_id, h=half_name, n=name: record(b, h, n, m, a, o)))
            handles.append(half.attn.qkv.register_forward_hook(count_qkv))
    try:
        tiny_models.sample(patched, family, steps=6, seed=3, width=128, height=128)
    finally:
        for handle in handles:
            handle.remove()
    assert checked == list(range(len(blocks))) * 2   # the first conservative step of each of two cycles
    # no joint attention at conservative steps: the halves' qkv run on one token, for their modulation
    assert qkv_tokens and set(qkv_tokens) == {1}
