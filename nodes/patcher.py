"""Wires a CacheRun into ComfyUI's sampling: an OUTER_SAMPLE wrapper gives each
sampling run its own fresh state and always tears it down, an APPLY_MODEL
wrapper tells the run which step each evaluation is, and the family adapter's
patches (block replacements, or object patches of block submodules) hand the
blocks' work to it."""
import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.samplers

from ..accel_core import memory
from ..accel_core.config import CacheConfig
from ..accel_core.lora import adapted_forward, check_lora_blocks
from ..accel_core.run import CacheRun
from ..accel_core.schedule import StepKind
from ..accel_core.tokencache import TokenPlanner, importance_curve
from .families import adapter_for

WRAPPER_KEY = "dit_token_cache"
SETTINGS_KEY = "dit_token_cache"      # in transformer_options: this model's TokenCacheSettings
RUN_KEY = "dit_token_cache_run"       # in transformer_options: the CacheRun of the sampling run under way


class TokenCacheSettings:
    """What the node chose. A fresh CacheRun is made from it for every sampling
    run, so two KSamplers sharing one patched model never share state."""

    def __init__(self, config: CacheConfig, name: str, adapter, node_id=None, planner_args=None, calibration=None):
        self.config = config
        self.adapter = adapter   # the family adapter of the patched model
        self.name = name
        self.node_id = node_id
        self.planner_args = planner_args   # TokenCache: (block count, predictor or None, fallback scoring)
        self.calibration = calibration     # TokenCache: measured reuse cost by sigma, where the I-steps go
        self.last_run = None   # the latest finished run, for its statistics
        self.active_run = None  # the run under way, for patches that get no transformer_options
        self.installed = None   # InstalledPatches: what this cache added to its clone, so a later node can undo it
        self.measured_peaks = {}  # (latent shape, conds) -> cache bytes its last run took: reserved in the next

    def new_run(self, model_sampling, sample_sigmas, conds: int = 1) -> CacheRun:
        start_sigma = float(model_sampling.percent_to_sigma(self.config.start_percent))
        end_sigma = float(model_sampling.percent_to_sigma(self.config.end_percent))
        planner = None
        if self.planner_args is not None:
            blocks, predictor, fallback = self.planner_args
            planner = TokenPlanner(blocks, self.config.cache_ratio, self.config.protected_last_blocks, predictor,
                                   self.config.seed, fallback)
        importance = importance_curve(self.calibration) if self.calibration else None
        return CacheRun(self.config, [float(s) for s in sample_sigmas], start_sigma, end_sigma, name=self.name,
                        planner=planner, step_importance=importance, time_of=time_coordinate(model_sampling),
                        conds=conds)


def time_coordinate(model_sampling):
    """sigma -> the model's own timestep scaled to [0, 1] by its value at
    sigma_max: the coordinate forecasts extrapolate in. It is sigma itself for
    flow-matching models (Flux, Wan, SD3, ...), and for discrete-time ones
    (PixArt) it is evenly spaced where their sigmas are not."""
    top = float(model_sampling.timestep(model_sampling.sigma_max))
    scale = 1.0 / top if top > 0 else 1.0
    return lambda sigma: float(model_sampling.timestep(torch.tensor(sigma, dtype=torch.float32))) * scale


def show_on_node(node_id, text: str) -> None:
    if node_id is None:
        return
    try:
        from server import PromptServer
        if PromptServer.instance is not None:
            PromptServer.instance.send_progress_text(text, node_id)
    except (ImportError, AttributeError):
        pass   # ComfyUI used as a library: no server to show it on


def evaluated_conds(guider) -> list:
    """(name, entry) of the conds the guider evaluates at every step (cond and
    uncond, or cond alone where ComfyUI skips the uncond at cfg 1)."""
    conds = getattr(guider, "conds", None) or {}
    skip_negative = math.isclose(getattr(guider, "cfg", 1.0), 1.0) and \
        not guider.model_options.get("disable_cfg1_optimization", False)
    return [(name, entry) for name, entries in conds.items() if not (name == "negative" and skip_negative)
            for entry in entries]


def projected_cache_bytes(settings: "TokenCacheSettings", run: CacheRun, model, conds: list, args, kwargs) -> int:
    """The cache this run will take (accel_core/memory.py), from the latent
    size and each cond's text length as the model will get it: ComfyUI's own
    extra_conds pads or adds text streams (Flux 2 pads to 512 tokens)."""
    noise = args[0]
    sampling_inputs = dict(latent_image=args[1], denoise_mask=args[4] if len(args) > 4 else kwargs.get("denoise_mask"),
                           seed=args[7] if len(args) > 7 else kwargs.get("seed"))
    dtype_bytes = torch.empty((), dtype=model.get_dtype_inference()).element_size()
    changes = run.planner is not None and run.planner.uses_changes
    total = 0
    try:
        for name, entry in conds:
            model_conds = comfy.samplers.encode_model_conds(model.extra_conds, [entry], noise, noise.device, name,
                                                            **sampling_inputs)[0]["model_conds"]
            layout = settings.adapter.cache_layout(noise.shape, settings.adapter.text_tokens(model_conds), dtype_bytes)
            total += memory.projected_cache_bytes(layout, settings.config, changes, rows=noise.shape[0])
    except Exception as error:   # a memory hint never stops a run: ComfyUI's own conditioning will say what is wrong
        logging.warning(f"{settings.name}: the cache size could not be projected ({error!r}); "
                        "nothing is reserved for it in this first run of this size")
        return 0
    return total


def reserved_for_cache(settings: "TokenCacheSettings", size_key, projected: Callable[[], int]) -> int:
    """GPU memory ComfyUI keeps free for the cache while it loads models, where
    the cache lives with the model: the budget if one is set, else what the
    cache took in the last run of this latent size and cond count, or before
    the first such run its projection."""
    config = settings.config
    if config.cache_device != "model_device":
        return 0
    if config.cache_budget_gb > 0:
        return int(config.cache_budget_bytes)
    if size_key in settings.measured_peaks:
        return settings.measured_peaks[size_key]
    return projected()


def refuse_multigpu_copies(model_patcher, name: str) -> None:
    """ComfyUI's MultiGPU CFG Split runs deep copies of the model on other
    GPUs, each in its own thread. The cache's adapters hold the main copy's
    blocks and one run state, so a copy would compute with another GPU's
    weights: refused, before anything loads."""
    copies = [m for m in model_patcher.get_additional_models_with_key("multigpu")
              if getattr(m, "is_multigpu_base_clone", False)]
    if copies:
        raise ValueError(f"{name} does not work with MultiGPU CFG Split yet ({len(copies)} model copies on "
                         f"{', '.join(str(m.load_device) for m in copies)}): each copy would need its own cache. "
                         "Remove the MultiGPU CFG Split node, or the token cache node, from this graph.")


def outer_sample_wrapper(executor, *args, **kwargs):
    guider = executor.class_obj
    settings: TokenCacheSettings = guider.model_options["transformer_options"][SETTINGS_KEY]
    refuse_multigpu_copies(guider.model_patcher, settings.name)
    cond_entries = evaluated_conds(guider)
    conds = max(1, len(cond_entries))
    size_key = (tuple(args[0].shape), conds)
    model = guider.model_patcher.model
    run = settings.new_run(model.model_sampling, args[3], conds)
    # ComfyUI's own reservation: model loading (inside this call) leaves the cache room
    reserved = reserved_for_cache(settings, size_key,
                                  lambda: projected_cache_bytes(settings, run, model, cond_entries, args, kwargs))
    original_options = guider.model_options
    guider.model_options = comfy.model_patcher.create_model_options_clone(original_options)
    guider.model_options["transformer_options"][RUN_KEY] = run
    settings.active_run = run
    comfy.model_management.EXTRA_RESERVED_VRAM += reserved
    try:
        return executor(*args, **kwargs)
    finally:
        comfy.model_management.EXTRA_RESERVED_VRAM -= reserved
        settings.active_run = None
        logging.info(run.stats.summary(settings.name))
        show_on_node(settings.node_id, run.stats.headline(settings.name))
        run.close()
        settings.last_run = run
        settings.measured_peaks[size_key] = run.stats.peak_cache_bytes
        guider.model_options = original_options


def transformer_options_of(args, kwargs) -> dict:
    """The transformer_options an APPLY_MODEL wrapper got, by keyword or last."""
    return kwargs.get("transformer_options", args[-1] if args else {})


def apply_model_wrapper(executor, x, t, *args, **kwargs):
    transformer_options = transformer_options_of(args, kwargs)
    run: CacheRun = transformer_options.get(RUN_KEY)
    if run is None:
        return executor(x, t, *args, **kwargs)
    uuids = transformer_options.get("uuids") or [None]
    rows = x.shape[0] // len(uuids)
    run.begin_forward(float(t.flatten()[0]), uuids, (tuple(x.shape[1:]), x.dtype, x.device, rows))
    try:
        return executor(x, t, *args, **kwargs)
    finally:
        run.end_forward()


# The cache's decisions are Python state that changes every step: torch.compile
# (ComfyUI's TorchCompileModel) must not trace them, or it recompiles at every
# new step kind and block and hits its recompile limit. Cached blocks run as
# written; the compiled graph keeps everything around them.
@torch.compiler.disable
def _block_patch(adapter_method, index, earlier_patch, args, extra):
    original = extra["original_block"]
    if earlier_patch is not None:
        # another node replaced this block before us: its patch stays the block
        original = functools.partial(earlier_patch, extra=extra)
    run: CacheRun = (args.get("transformer_options") or {}).get(RUN_KEY)
    if run is None or run.plan is None:
        return original(args)
    return adapter_method(run, index, args, original, replaced_elsewhere=earlier_patch is not None)


class PatchHooks:
    """What an adapter's install() gets: block-replace patches that keep any
    earlier replacement, and the run under way."""

    def __init__(self, model_patcher, settings: TokenCacheSettings):
        self._earlier = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get("dit", {})
        self._settings = settings

    def block_replace(self, adapter_method, block_name, index):
        return functools.partial(_block_patch, adapter_method, index, self._earlier.get((block_name, index)))

    def current_run(self):
        return self._settings.active_run

    def caching_step(self) -> bool:
        """Whether the step under way is one where caching is active (a P-step / conservative step)."""
        run = self._settings.active_run
        return run is not None and run.plan is not None and run.plan.kind is StepKind.CONSERVATIVE

    def count_adapter_work(self, flops: float) -> None:
        self._settings.active_run.stats.record_adapters(flops)


def install_lora(model_patcher, lora, hooks: PatchHooks) -> None:
    """TokenCache's refinement adapters as object patches of their linear
    layers' forwards on the clone: the layers keep their own forward (and the
    weight patches of the user's LoRAs); the adapter adds its output at the
    steps where caching is active, and its work counts as computed."""
    for layer in lora.spec.layers:
        name = f"diffusion_model.{layer}.forward"
        forward = model_patcher.get_model_object(name)
        model_patcher.add_object_patch(name, functools.partial(adapted_forward, forward, lora.adapter(layer),
                                                               hooks.caching_step, hooks.count_adapter_work))


@dataclass
class InstalledPatches:
    """The patches one token cache put on its clone, each with what it replaced."""
    objects: dict    # object patch name -> (value before, ours)
    blocks: dict     # ("double_block", i) ... -> (block replacement before, ours)


_NOTHING = object()


def _dit_replacements(model_patcher) -> dict:
    return model_patcher.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault("dit", {})


def _installing(model_patcher, install) -> InstalledPatches:
    objects, blocks = dict(model_patcher.object_patches), dict(_dit_replacements(model_patcher))
    install()

    def added(before, after):
        return {key: (before.get(key, _NOTHING), value) for key, value in after.items()
                if before.get(key, _NOTHING) is not value}
    return InstalledPatches(added(objects, model_patcher.object_patches), added(blocks, _dit_replacements(model_patcher)))


def _uninstall(model_patcher, earlier: TokenCacheSettings) -> None:
    """Undo an earlier token cache's patches on this clone, so the cache
    applied last is the only one: two would both drive the same run. A patch
    another node has since put over ours stays, and is said once."""
    kept = 0
    for patches, table in ((earlier.installed.objects, model_patcher.object_patches),
                           (earlier.installed.blocks, _dit_replacements(model_patcher))):
        for key, (before, ours) in patches.items():
            if table.get(key) is not ours:
                kept += 1
            elif before is _NOTHING:
                del table[key]
            else:
                table[key] = before
    for wrapper_type in (comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, comfy.patcher_extension.WrappersMP.APPLY_MODEL):
        model_patcher.remove_wrappers_with_key(wrapper_type, WRAPPER_KEY)
    del model_patcher.model_options["transformer_options"][SETTINGS_KEY]
    if kept:
        logging.warning(f"{earlier.name}: {kept} of its block patches were patched again by another node after it; "
                        "those blocks keep that node's patch")


def apply_token_cache(model, config: CacheConfig, name: str = "DuCa", node_id=None, predictor=None, calibration=None,
                      fallback="change", lora=None):
    """A patched clone of `model`; the input model is left as it was. TokenCache
    (config.mode "tokencache") takes an optional learned predictor and its
    calibration; without one, tokens are scored by their change ("change") or
    at random ("random", a baseline for comparisons); `lora` (BlockLoRA) the
    refinement adapters of its protected last blocks. A model that already
    carries a token cache gets this one instead: the last node wins."""
    adapter = adapter_for(model)
    planner_args = None
    if config.mode == "tokencache":
        planner_args = (adapter.block_count, predictor, fallback)
    if config.selector not in adapter.selectors:
        raise ValueError(f"selector={config.selector!r} is not available for {adapter.family} models "
                         f"(it needs the attention's keys and values); accepted: {', '.join(adapter.selectors)}")
    if lora is not None:
        check_lora_blocks(lora, adapter.block_count, config.protected_last_blocks, name)
    patched = model.clone()
    earlier = patched.model_options["transformer_options"].get(SETTINGS_KEY)
    if earlier is not None:
        _uninstall(patched, earlier)
        message = f"{name} replaces {earlier.name} applied earlier to this model: only the last token cache node applies"
        logging.warning(message)
        show_on_node(node_id, message)
    settings = TokenCacheSettings(config, name, adapter, node_id, planner_args, calibration)
    patched.model_options["transformer_options"][SETTINGS_KEY] = settings
    if config.caches_something:
        def install():
            hooks = PatchHooks(patched, settings)
            adapter.install(patched, hooks)
            if lora is not None:
                install_lora(patched, lora, hooks)
        settings.installed = _installing(patched, install)
    else:
        # cycle_length 1: every step computes in full, so the blocks stay the model's own (and compiled
        # models stay bit-identical); the run still reports its steps
        settings.installed = InstalledPatches({}, {})
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, outer_sample_wrapper)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return patched
