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
its rows, separate calls from the first call's); mode tokencache with a
predictor file trained by the TokenCacheTrainPredictor node (or
scripts/train_predictor.py) on the same model in ComfyUI: Flux plans in
ComfyUI's space, cat(text, image), so every file trained on a Flux model runs
here, first-block predictors and LoRA adapters included (their ComfyUI
layers mapped to diffusers'; flux_layers.py); on the other families
mlp_mixer predictors, which read only the tokens. Not yet: other
transformers (a clear error naming the supported ones)."""
import dataclasses
import functools
import inspect
import os
from typing import Callable, Optional

import torch

from ..accel_core.config import CacheConfig
from ..accel_core.lora import AdapterRows, adapted_forward, check_lora_blocks
from ..accel_core.predictor_file import PLACEMENTS, PredictorFileError, load_lora, load_predictor, step_importance
from ..accel_core.run import CacheRun
from ..accel_core.schedule import StepKind
from ..accel_core.tokencache import TokenPlanner, importance_curve
from ..nodes.adapters.modulewise import REUSE, SUBSET, BlockGroup, CachedModule, ModulewiseAdapter, text_and_image
from . import flux_layers

HOOK = "dit_token_cache"
LORA_HOOK = "dit_token_cache_lora"   # under the engine's hooks: a P-step's token subset reaches it
ROOT = "diffusion_model."   # the engine's block paths are ComfyUI's (under BaseModel); here, under the transformer


def flux_adapter(transformer) -> ModulewiseAdapter:
    """FluxTransformer2DModel: double blocks call their joint attention (returning image and text) and two
    feed-forwards; single blocks run attention and an MLP input projection on cat(text, image), then
    proj_out on both, so proj_mlp and proj_out run on the selected tokens at conservative steps.
    TokenCache plans cat(text, image), as ComfyUI's Flux adapter does."""
    text = dict(token_input=(0, "hidden_states"), token_output=1, text_input=(1, "encoder_hidden_states"), text_output=0)
    return ModulewiseAdapter(transformer, "Flux (diffusers)", [
        BlockGroup("transformer_blocks", (
            CachedModule("attn", REUSE, input_name="hidden_states", output_streams=(0, 1)),
            CachedModule("ff", SUBSET),
            CachedModule("ff_context", SUBSET, stream=1),
        ), text_and_image, **text),
        BlockGroup("single_transformer_blocks", (
            CachedModule("attn", REUSE, input_name="hidden_states"),
            CachedModule("proj_mlp", SUBSET),
            CachedModule("proj_out", SUBSET),
        ), text_and_image, text_in_tokens=True, **text),
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


def flux_predictor_block(adapter: ModulewiseAdapter):
    """A first-block predictor of a ComfyUI Flux model on diffusers' Flux: (the
    first_block() and the tensor renaming load_predictor takes)."""
    block = adapter.blocks[0][1]
    kind = flux_layers.KINDS[adapter.blocks[0][2].path]
    hidden, mlp_hidden = adapter.hidden, flux_layers.mlp_hidden(block)

    def first_block():
        return adapter.predictor_block(for_training=False), adapter.predictor_runner(), kind
    return first_block, lambda tensors: flux_layers.convert_block(tensors, kind, hidden, mlp_hidden)


def flux_lora_layers(adapter: ModulewiseAdapter) -> dict:
    """ComfyUI layer of a predictor file's LoRA -> [(diffusers layer, its rows of the adapter's output)]."""
    layers = {}
    for path, block, group in adapter.blocks:
        ours = path.removeprefix(ROOT)
        comfy = ours.replace(group.path, flux_layers.COMFY_PATHS[group.path], 1)
        layers_of = flux_layers.linear_layers(flux_layers.KINDS[group.path], adapter.hidden, flux_layers.mlp_hidden(block))
        for layer, parts in layers_of.items():
            layers[f"{comfy}.{layer}"] = [(f"{ours}.{name}", rows) for name, rows in parts]
    return layers


def same_layers(adapter: ModulewiseAdapter) -> dict:
    """Each linear layer of the blocks under its own name (families ComfyUI names as diffusers does)."""
    return {f"{path.removeprefix(ROOT)}.{name}": [(f"{path.removeprefix(ROOT)}.{name}", None)]
            for path, block, _ in adapter.blocks for name, module in block.named_modules()
            if isinstance(module, torch.nn.Linear)}


@dataclasses.dataclass(frozen=True)
class Family:
    adapter: Callable                 # transformer -> ModulewiseAdapter
    timestep_scale: float             # what the pipelines pass as timestep per unit of sigma
    predictor_family: tuple           # ComfyUI's key and name of the family, as predictor files record it
    lora_layers: Optional[Callable] = None   # adapter -> {ComfyUI layer: [(diffusers layer, rows)]}, where mapped
    first_block: Optional[Callable] = None   # adapter -> (first_block, block_tensors), where first-block predictors run


FAMILIES = {"FluxTransformer2DModel": Family(flux_adapter, 1.0, ("flux", "Flux"), flux_lora_layers,
                                             flux_predictor_block),
            "QwenImageTransformer2DModel": Family(qwen_image_adapter, 1.0, ("qwen_image", "Qwen-Image"), same_layers),
            "WanTransformer3DModel": Family(wan_adapter, 1000.0, ("wan", "Wan")),
            "SD3Transformer2DModel": Family(sd3_adapter, 1000.0, ("sd3", "SD3 / SD3.5"))}


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

    def __init__(self, transformer, scheduler, config: CacheConfig, adapter, name: str, timestep_scale: float,
                 predictor=None, calibration: Optional[dict] = None):
        self.transformer, self.scheduler, self.config, self.adapter, self.name = (
            transformer, scheduler, config, adapter, name)
        self.timestep_scale = timestep_scale        # the family's pipelines pass timestep = sigma x this
        self.predictor = predictor                  # TokenCache's learned predictor (None: training-free scoring)
        self.calibration = calibration              # where TokenCache's I-steps go, by sigma (None: evenly)
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
        if self.config.mode == "tokencache":   # without a predictor: tokens whose outputs changed most
            planner = TokenPlanner(self.adapter.block_count, self.config.cache_ratio,
                                   self.config.protected_last_blocks, self.predictor, self.config.seed, "change")
        importance = importance_curve(self.calibration) if self.calibration else None
        return CacheRun(self.config, sigmas, start, end, name=self.name, planner=planner, step_importance=importance)

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

    def caching_step(self) -> bool:
        """Whether the step under way is one where caching is active (a P-step): where LoRA adapters act."""
        run = self.active_run
        return run is not None and run.plan is not None and run.plan.kind is StepKind.CONSERVATIVE

    def count_adapter_work(self, flops: float) -> None:
        self.active_run.stats.record_adapters(flops)

    # -- what users call ------------------------------------------------------------------
    def summary(self) -> str:
        """The DuCa node's one-line summary of the latest run ('' before any)."""
        return self.run.stats.headline(self.name) if self.run is not None else ""

    def remove(self) -> None:
        """Take every hook off: the transformer computes as it did before."""
        from diffusers.hooks import HookRegistry
        for module, name in reversed(self._hooked):
            HookRegistry.check_if_exists_or_initialize(module).remove_hook(name, recurse=False)
        self._hooked.clear()
        if getattr(self.transformer, "_dit_token_cache", None) is self:
            del self.transformer._dit_token_cache
        if self.run is not None:
            self.run.close()

    def _hook(self, module, wrap, name: str = HOOK) -> None:
        from diffusers.hooks import HookRegistry
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_hook_class()(wrap), name)
        self._hooked.append((module, name))

    def install_lora(self, lora, layers: dict) -> None:
        """TokenCache's LoRA adapters on the linear layers they refine (`layers`:
        the file's layer -> [(diffusers layer, rows)]), active at P-steps."""
        for layer in lora.spec.layers:
            adapter = lora.adapter(layer)
            for path, rows in layers[layer]:
                part = adapter if rows is None else AdapterRows(adapter, rows)
                self._hook(self.transformer.get_submodule(path), lambda forward, part=part: functools.partial(
                    adapted_forward, forward, part, self.caching_step, self.count_adapter_work), LORA_HOOK)


def apply_token_cache(transformer, scheduler=None, name: Optional[str] = None, predictor: Optional[str] = None,
                      i_step_placement: str = "measured", **settings) -> TokenCacheHandle:
    """Cache `transformer` (a diffusers model) with the DuCa node's settings
    (accel_core.config.CacheConfig, validated the same way); mode
    "tokencache" with the TokenCache node's settings: `predictor`, the path
    of a predictor file trained on this model (None: the training-free
    scoring), and `i_step_placement` (measured, predicted or even; evenly
    without a predictor); `scheduler` (the pipeline's) gives each run's
    sigmas. Returns the handle."""
    family = FAMILIES.get(type(transformer).__name__)
    if family is None:
        raise ValueError(f"Token caching does not support this diffusers model yet: {type(transformer).__name__}. "
                         f"Supported: {', '.join(FAMILIES)}.")
    if scheduler is None or not hasattr(scheduler, "sigmas"):
        raise ValueError("apply_token_cache needs scheduler=pipe.scheduler (a scheduler with sigmas): "
                         "the cache decides each step's kind from the pipeline's sigma schedule")
    config = CacheConfig(**settings)
    if predictor is not None and config.mode != "tokencache":
        raise ValueError(f"predictor= is TokenCache's: give mode='tokencache' with it (mode={config.mode!r})")
    if i_step_placement not in PLACEMENTS:
        raise ValueError(f"i_step_placement={i_step_placement!r}; accepted: {', '.join(PLACEMENTS)}")
    adapter = family.adapter(transformer)
    if config.selector not in adapter.selectors:
        raise ValueError(f"selector={config.selector!r} is not available for {adapter.family} models; "
                         f"accepted: {', '.join(adapter.selectors)}")
    learned, calibration, lora, lora_layers = None, None, None, None
    if predictor is not None:
        learned, calibration, lora, lora_layers = _load_for(family, adapter, str(predictor))
        calibration = step_importance(calibration, i_step_placement)
        if lora is not None:
            check_lora_blocks(lora, adapter.block_count, config.protected_last_blocks, "TokenCache")
    if name is None:   # the node's names
        name = ("DuCa" if config.mode != "tokencache" else "TokenCache[fallback]" if learned is None
                else "TokenCache[learned+LoRA]" if lora is not None else "TokenCache[learned]")
    existing = getattr(transformer, "_dit_token_cache", None)
    if existing is not None:
        existing.remove()   # the last cache applied wins, as in ComfyUI
    handle = TokenCacheHandle(transformer, scheduler, config, adapter, name, family.timestep_scale, learned, calibration)
    handle._hook(transformer, lambda forward: functools.partial(handle._call, forward))
    if config.caches_something:
        if lora is not None:   # first: the engine's hooks wrap the adapted layers
            handle.install_lora(lora, lora_layers)

        def replace(path, wrap):
            handle._hook(transformer.get_submodule(path.removeprefix(ROOT)), wrap)
        adapter.replace_forwards(replace, handle.current_run)
    transformer._dit_token_cache = handle
    return handle


def _load_for(family: Family, adapter: ModulewiseAdapter, path: str):
    """(predictor, calibration, LoRA adapters or None, their layers here) from a predictor file trained on this
    model in ComfyUI; ValueError naming what does not fit."""
    name = os.path.basename(path)
    expect = {"family": family.predictor_family, "hidden_size": adapter.hidden, "blocks": adapter.block_count,
              "token_layout": adapter.token_layout}

    def no_first_block():
        raise PredictorFileError(f"{name}: a first-block predictor (a copy of ComfyUI's first {adapter.family} "
                                 "block) runs on diffusers' Flux only; on this model use an mlp_mixer predictor "
                                 "(architecture mlp_mixer) or none")
    first_block, block_tensors = family.first_block(adapter) if family.first_block else (no_first_block, None)
    try:
        predictor, metadata = load_predictor(path, expect=expect, first_block=first_block, block_tensors=block_tensors)
        if metadata.get("lora") is not None and family.lora_layers is None:
            raise PredictorFileError(f"{name}: its LoRA adapters refine ComfyUI's {adapter.family} layers, which are "
                                     "not mapped to diffusers' yet; use a predictor trained with lora_rank 0")
        layers = family.lora_layers(adapter) if family.lora_layers else {}
        # a ComfyUI layer's (in, out): a split one's out is the sum of the layers it became (read only for a LoRA)
        linear = adapter.diffusion_model.get_submodule
        lora = load_lora(path, lambda: {layer: (linear(parts[0][0]).in_features,
                                                sum(linear(part).out_features for part, _ in parts))
                                        for layer, parts in layers.items()}, adapter.block_count)
    except PredictorFileError as error:
        raise ValueError(f"TokenCache predictor {name} cannot drive this model: {error}") from None
    return predictor, metadata.get("calibration"), lora, layers


__all__ = ["apply_token_cache", "TokenCacheHandle"]
