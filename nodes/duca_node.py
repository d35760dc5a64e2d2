"""The DuCa Cache node: MODEL in, token-cached MODEL out."""
from comfy_api.v0_0_2 import io

from ..accel_core.config import CACHE_DEVICES, DUCA_MODES, SELECTORS, CacheConfig
from ..accel_core.forecast import FORECASTS
from ..accel_core.precision import PRECISIONS
from .families import supported_families
from .patcher import apply_token_cache

CATEGORY = "sampling/token_cache"
DEFAULT_FORECAST = "linear"
DEFAULT_PRECISION = "bf16"
PRECISION_TOOLTIP = ("How cached features are stored: model (as computed), bf16 (2 bytes a value; the same as model "
                     "for bf16/fp16 models), fp8 (1 byte a value with a scale per token: half of bf16). Lower "
                     "precision is smaller and costs a little quality (BENCHMARKS.md).")
BUDGET_TOOLTIP = ("The most memory the cache may use, in GiB; 0: no limit. Blocks are cached in order while their "
                  "cache fits; the others compute in full at every step (slower, never wrong). ComfyUI keeps this "
                  "much free when it loads the model. The summary says how many blocks were cached.")


def memory_inputs():
    """The widgets that bound the cache's memory, shared by the cache nodes."""
    return [io.Combo.Input("cache_precision", options=list(PRECISIONS), default=DEFAULT_PRECISION,
                           tooltip=PRECISION_TOOLTIP),
            io.Float.Input("cache_budget_gb", default=0.0, min=0.0, max=4096.0, step=0.5, tooltip=BUDGET_TOOLTIP)]
FORECAST_TOOLTIP = ("How values a step does not compute stand in for fresh ones: reuse (the research method) takes "
                    "them as last computed; linear and quadratic extrapolate each value from the last two or three "
                    "steps at which it was computed (a lower order where those are far apart). Each order keeps "
                    "one more copy of the cache.")


class DuCaCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="DuCaCache",
            display_name="DuCa Cache",
            category=CATEGORY,
            search_aliases=["ToCa", "FORA", "DuCa", "token cache", "feature cache", "speed up", "accelerate",
                            "faster sampling", "cache"],
            description=("Dual Feature Caching for diffusion transformers: every cycle starts with a full step, "
                         "then alternates aggressive steps (reuse every block) and conservative steps (recompute a "
                         f"subset of tokens in each block). Supported: {supported_families()}."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion transformer to accelerate. The input model is not changed."),
                io.Float.Input("cache_ratio", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of tokens that reuse the cache at a conservative step "
                                       "(0.9: 10% of tokens are recomputed in each block)."),
                io.Int.Input("cycle_length", default=5, min=1, max=100,
                             tooltip="A full step every N steps; 1 turns caching off. Higher is faster and drifts more."),
                io.Combo.Input("selector", options=list(SELECTORS), default="random",
                               tooltip="Which tokens a conservative step recomputes. random needs no attention map and "
                                       "keeps fast attention kernels; v_norm/k_norm: smallest value/key norms first; "
                                       "similarity: most changed inputs first; attention: most attended tokens, "
                                       "estimated from a sample of queries."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching starts at this point of the sampling schedule; earlier steps compute in full."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching ends at this point of the sampling schedule; later steps compute in full."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Seed of the random token selector: the same seed reproduces the same image."),
                io.Combo.Input("mode", options=list(DUCA_MODES), default="duca", advanced=True,
                               tooltip="duca: alternate aggressive and conservative steps; toca: conservative steps only; "
                                       "fora: aggressive steps only (step-level reuse)."),
                io.Float.Input("staleness_weight", default=0.25, min=0.0, max=10.0, step=0.01, advanced=True,
                               tooltip="Bonus for tokens that have reused the cache for long, so they are recomputed sooner."),
                io.Combo.Input("cache_device", options=list(CACHE_DEVICES), default="model_device", advanced=True,
                               tooltip="Where the cache lives: with the model (fastest) or in CPU memory (saves GPU memory, "
                                       "costs transfers)."),
                io.Combo.Input("forecast", options=list(FORECASTS), default=DEFAULT_FORECAST, tooltip=FORECAST_TOOLTIP),
                io.Float.Input("max_error", default=0.0, min=0.0, max=10.0, step=0.005, advanced=True,
                               tooltip="Error-aware schedule: conservative steps measure the cache error on the tokens "
                                       "they recompute; above this relative error the next step is a full step, well "
                                       "below it a cycle may stretch to twice cycle_length. 0 keeps fixed cycles. "
                                       "Modes duca and toca."),
                *memory_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with DuCa token caching.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, cache_ratio, cycle_length, selector, start_percent, end_percent, seed,
                mode="duca", staleness_weight=0.25, cache_device="model_device", forecast=DEFAULT_FORECAST,
                max_error=0.0, cache_precision=DEFAULT_PRECISION, cache_budget_gb=0.0) -> io.NodeOutput:
        config = CacheConfig(cache_ratio=cache_ratio, cycle_length=cycle_length, selector=selector,
                             start_percent=start_percent, end_percent=end_percent, seed=seed, mode=mode,
                             staleness_weight=staleness_weight, cache_device=cache_device, forecast=forecast,
                             max_error=max_error, cache_precision=cache_precision, cache_budget_gb=cache_budget_gb)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        return io.NodeOutput(apply_token_cache(model, config, name=f"DuCa[{mode}]", node_id=node_id))
