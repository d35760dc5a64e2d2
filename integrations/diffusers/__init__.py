"""The pack's caches on a diffusers transformer, through diffusers' own hooks.

    from dit_token_cache.diffusers import apply_token_cache
    handle = apply_token_cache(pipe.transformer, scheduler=pipe.scheduler, mode="duca", cache_ratio=0.9,
                               cycle_length=5, selector="random", forecast="linear")
    image = pipe(prompt, num_inference_steps=28).images[0]
    print(handle.summary())   # the DuCa node's one-line summary
    handle.remove()           # the transformer as it was

The same core decides (accel_core.CacheRun) and the same engine computes as
in ComfyUI (nodes/adapters/modulewise.py): each block and its attention and
MLP submodules get a hook that hands their work to the run; the blocks' own
code keeps doing modulation, gating and residuals. A run starts when the
transformer is called at a higher sigma than the last call (a new pipeline
call) and follows the scheduler's sigmas. Calls at the same sigma are the
step's conds (true CFG's cond and uncond), each with its own cache; a
batched CFG call is one cond whose rows are cached together.

Supported: FluxTransformer2DModel (Flux.1 dev/schnell, Kontext),
WanTransformer3DModel (Wan 2.1 / 2.2), QwenImageTransformer2DModel,
SD3Transformer2DModel (SD3, SD3.5); modes duca, toca, fora; selectors random
and similarity; a memory budget (cache_budget_gb: a step's separate calls
are counted as they arrive, and the blocks cached at the first call that no
longer fit give way); mode tokencache with its training-free scoring (the
TokenCache node without a predictor file; a batched CFG call plans from all
its rows, separate calls from the first call's). Not yet: a learned TokenCache
predictor file; other transformers (a clear error naming the supported ones)."""
import dataclasses
import functools
import inspect
from typing import Optional

import torch

from ..accel_core.config import CacheConfig
from ..accel_core.run import CacheRun
from ..accel_core.tokencache import TokenPlanner
from ..nodes.adapters.modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, text_and_image

HOOK = "dit_token_cache"
ROOT = "diffusion_model."   # the engine's block paths are ComfyUI's (under BaseModel); here, under the transformer


def flux_adapter(transformer) -> ModulewiseAdapter:
    """FluxTransformer2DModel: double blocks call their joint attention (returning image and text) and two
    feed-forwards; single blocks run attention and an MLP input projection on cat(text, image), then
    proj_out on both, so proj_mlp and proj_out run on the selected tokens at conservative steps."""
    return ModulewiseAdapter(transformer, "Flux (diffusers)", [
        BlockGroup("transformer_blocks", (
            CachedModule("attn", REUSE, input_name="hidden_states", output_streams=(0, 1)),
            CachedModule("ff", SUBSET),
            CachedModule("ff_context", SUBSET, stream=1),
        ), text_and_image, token_input=(0, "hidden_states"), token_output=1),
        BlockGroup("single_transformer_blocks", (
            CachedModule("attn", REUSE, input_name="hidden_states"),
            CachedModule("proj_mlp", SUBSET),
            CachedModule("proj_out", SUBSET),
        ), text_and_image, token_input=(0, "hidden_states"), token_output=1, text_in_tokens=True),
    ], output_layer="norm_out", patch=1)


def hidden_states_input(args, kwargs):
    """What a single-stream block called as block(hidden_states, ...) returns when skipped."""
    return args[0] if args else kwargs["hidden_states"]


def wan_adapter(transformer) -> ModulewiseAdapter:
    """WanTransformer3DModel (Wan 2.1 / 2.2): a block calls self-attention attn1, cross-attention attn2
    (its queries are the video tokens; keys and values come from the text, and image for i2v) and ffn,
    and returns the video tokens."""
    return ModulewiseAdapter(transformer, "Wan (diffusers)", [BlockGroup("blocks", (
        CachedModule("attn1", REUSE),
        CachedModule("attn2", SUBSET, context_linears=("to_k", "to_v", "add_k_proj", "add_v_proj")),
        CachedModule("ffn", SUBSET),
    ), hidden_states_input, token_input=(0, "hidden_states"))], output_layer="norm_out",
        patch=tuple(transformer.config.patch_size))


def qwen_image_adapter(transformer) -> ModulewiseAdapter:
    """QwenImageTransformer2DModel: the same blocks as ComfyUI's Qwen-Image (which follows diffusers' code)."""
    return ModulewiseAdapter(transformer, "Qwen-Image (diffusers)", [BlockGroup("transformer_blocks", (
        CachedModule("attn", REUSE, input_name="hidden_states", output_streams=(0, 1)),
        CachedModule("img_mlp", SUBSET),
        CachedModule("txt_mlp", SUBSET, stream=1),
    ), text_and_image, token_input=(0, "hidden_states"), token_output=1)], output_layer="norm_out",
        patch=transformer.config.patch_size)


def sd3_adapter(transformer) -> ModulewiseAdapter:
    """SD3Transformer2DModel (SD3, SD3.5): JointTransformerBlocks call their joint attention (image and
    text outputs), SD3.5's image-only attn2 in the blocks that have one, and ff / ff_context; the last
    block is context_pre_only (no ff_context, no text output)."""
    adapter = ModulewiseAdapter(transformer, "SD3 (diffusers)", [BlockGroup("transformer_blocks", (
        CachedModule("attn", REUSE, input_name="hidden_states", output_streams=(0, 1)),
        CachedModule("attn2", REUSE, input_name="hidden_states"),
        CachedModule("ff", SUBSET),
        CachedModule("ff_context", SUBSET, stream=1),
    ), text_and_image, token_input=(0, "hidden_states"), token_output=1)], output_layer="norm_out",
        patch=transformer.config.patch_size)
    return _modules_each_block_has(adapter)


def _modules_each_block_has(adapter: ModulewiseAdapter) -> ModulewiseAdapter:
    """Each block's declaration without the modules it lacks (None or absent)."""
    def has(block, path):
        return isinstance(getattr(block, path, None), torch.nn.Module)
    adapter.blocks = [(path, block, dataclasses.replace(group, modules=tuple(
        spec for spec in group.modules if has(block, spec.path)))) for path, block, group in adapter.blocks]
    return adapter


# family -> (adapter, what the pipelines pass as timestep per unit of sigma)
FAMILIES = {"FluxTransformer2DModel": (flux_adapter, 1.0),
            "QwenImageTransformer2DModel": (qwen_image_adapter, 1.0),
            "WanTransformer3DModel": (wan_adapter, 1000.0),
            "SD3Transformer2DModel": (sd3_adapter, 1000.0)}


@functools.lru_cache(maxsize=None)
def _hook_class():   # defined on first use: diffusers is imported only when a cache is applied
    from diffusers.hooks import ModelHook

    class ReplacedForward(ModelHook):
        """The module's forward replaced by wrap(its forward)."""

        def __init__(self, wrap):
            super().__init__()
            self.wrap = wrap
            self.replaced = None

        def new_forward(self, module, *args, **kwargs):
            if self.replaced is None:
                self.replaced = self.wrap(self.fn_ref.original_forward)
            return self.replaced(*args, **kwargs)
    return ReplacedForward


class TokenCacheHandle:
    """What apply_token_cache returns: the runs' state, summary() and remove()."""

    def __init__(self, transformer, scheduler, config: CacheConfig, adapter, name: str, timestep_scale: float):
        self.transformer, self.scheduler, self.config, self.adapter, self.name = (
            transformer, scheduler, config, adapter, name)
        self.timestep_scale = timestep_scale        # the family's pipelines pass timestep = sigma x this
        self._signature = inspect.signature(type(transformer).forward)
        self.run: Optional[CacheRun] = None      # the latest run (finished or under way)
        self.active_run: Optional[CacheRun] = None   # set during a transformer call
        self._last_sigma = None
        self._calls_at_sigma = 0
        self._hooked = []                        # modules with our hook

    # -- the run ------------------------------------------------------------------------
    def _new_run(self) -> CacheRun:
        sigmas = [float(s) for s in self.scheduler.sigmas]
        top = len(sigmas) - 1
        start = sigmas[min(top, round(self.config.start_percent * top))]
        end = sigmas[min(top, round(self.config.end_percent * top))]
        planner = None
        if self.config.mode == "tokencache":   # the training-free scoring: tokens whose outputs changed most
            planner = TokenPlanner(self.adapter.block_count, self.config.cache_ratio,
                                   self.config.protected_last_blocks, None, self.config.seed, "change")
        return CacheRun(self.config, sigmas, start, end, name=self.name, planner=planner)

    def _call(self, original, *args, **kwargs):
        call = self._signature.bind(self.transformer, *args, **kwargs).arguments
        hidden = call["hidden_states"]
        sigma = float(torch.as_tensor(call["timestep"]).flatten()[0]) / self.timestep_scale
        if self.run is None or sigma > self._last_sigma + 1e-9:
            self.run = self._new_run()        # a new pipeline call: the schedule restarts
            self._calls_at_sigma = 0
        elif sigma != self._last_sigma:
            self._calls_at_sigma = 0
        self._last_sigma = sigma
        cond = f"call {self._calls_at_sigma}"   # true CFG's separate calls at one step keep their own caches
        self._calls_at_sigma += 1
        run = self.run
        run.count_conds(self._calls_at_sigma)   # a memory budget is projected over every call of a step
        run.begin_forward(sigma, [cond], (tuple(hidden.shape[1:]), hidden.dtype, hidden.device, hidden.shape[0]))
        self.active_run = run
        try:
            return original(*args, **kwargs)
        finally:
            self.active_run = None
            run.end_forward()

    def current_run(self) -> Optional[CacheRun]:
        return self.active_run

    # -- what users call ------------------------------------------------------------------
    def summary(self) -> str:
        """The DuCa node's one-line summary of the latest run ('' before any)."""
        return self.run.stats.headline(self.name) if self.run is not None else ""

    def remove(self) -> None:
        """Take every hook off: the transformer computes as it did before."""
        from diffusers.hooks import HookRegistry
        for module in self._hooked:
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(HOOK, recurse=False)
        self._hooked.clear()
        if getattr(self.transformer, "_dit_token_cache", None) is self:
            del self.transformer._dit_token_cache
        if self.run is not None:
            self.run.close()

    def _hook(self, module, wrap) -> None:
        from diffusers.hooks import HookRegistry
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_hook_class()(wrap), HOOK)
        self._hooked.append(module)


def apply_token_cache(transformer, scheduler=None, name: Optional[str] = None, **settings) -> TokenCacheHandle:
    """Cache `transformer` (a diffusers model) with the DuCa node's settings
    (accel_core.config.CacheConfig, validated the same way; mode "tokencache"
    is the TokenCache node's without a predictor); `scheduler` (the
    pipeline's) gives each run's sigmas. Returns the handle."""
    if "predictor" in settings:
        raise ValueError("a learned TokenCache predictor file is not supported on diffusers yet; "
                         "mode='tokencache' without one uses the training-free scoring")
    family, timestep_scale = FAMILIES.get(type(transformer).__name__, (None, None))
    if family is None:
        raise ValueError(f"Token caching does not support this diffusers model yet: {type(transformer).__name__}. "
                         f"Supported: {', '.join(FAMILIES)}.")
    if scheduler is None or not hasattr(scheduler, "sigmas"):
        raise ValueError("apply_token_cache needs scheduler=pipe.scheduler (a scheduler with sigmas): "
                         "the cache decides each step's kind from the pipeline's sigma schedule")
    config = CacheConfig(**settings)
    if name is None:   # the node's names (TokenCache without a predictor file: its fallback)
        name = "TokenCache[fallback]" if config.mode == "tokencache" else "DuCa"
    existing = getattr(transformer, "_dit_token_cache", None)
    if existing is not None:
        existing.remove()   # the last cache applied wins, as in ComfyUI
    adapter = family(transformer)
    if config.selector not in adapter.selectors:
        raise ValueError(f"selector={config.selector!r} is not available for {adapter.family} models; "
                         f"accepted: {', '.join(adapter.selectors)}")
    handle = TokenCacheHandle(transformer, scheduler, config, adapter, name, timestep_scale)
    handle._hook(transformer, lambda forward: functools.partial(handle._call, forward))
    if config.caches_something:
        def replace(path, wrap):
            handle._hook(transformer.get_submodule(path.removeprefix(ROOT)), wrap)
        adapter.replace_forwards(replace, handle.current_run)
    transformer._dit_token_cache = handle
    return handle


__all__ = ["apply_token_cache", "TokenCacheHandle"]
