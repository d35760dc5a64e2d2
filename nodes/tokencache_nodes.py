"""TokenCache nodes: use a learned cache predictor (or the training-free
fallback), and train one on your own model inside ComfyUI."""
import logging
import os
from typing import Optional

import folder_paths
from comfy_api.v0_0_2 import io

import comfy.samplers
import comfy.utils

from ..accel_core.config import CacheConfig
from ..accel_core.forecast import FORECASTS
from .duca_node import DEFAULT_PRECISION, FORECAST_TOOLTIP, memory_inputs
from ..accel_core.lora import linear_layers
from ..accel_core.predictor_file import (PLACEMENTS, PredictorFileError, load_lora, load_predictor, save_predictor,
                                        step_importance)
from ..reference.model import PREDICTOR_DIR
from .patcher import apply_token_cache, show_on_node
from .families import adapter_for
from .predictor_training import (ARCHITECTURES, OBJECTIVES, TrainingSettings, predictor_expectations,
                                 train_with_refinement)

CATEGORY = "sampling/token_cache"
FOLDER = "token_cache"
NO_PREDICTOR = "none"
DEFAULT_LORA_RANK = 8   # on: +0.57 dB on the reference model for 2 % more work (BENCHMARKS.md, issue 12)
MAX_NAME_BYTES = 255   # NAME_MAX of common file systems (ext4, NTFS, APFS)
# reuse: I-steps lie far apart, and a trend carried from them was measured worse (BENCHMARKS.md)
TOKENCACHE_FORECAST = "reuse"

if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})
# the predictor shipped for the demo reference model is listed too; new ones go to models/token_cache
folder_paths.add_model_folder_path(FOLDER, str(PREDICTOR_DIR), is_default=False)


def predictor_file_name(filename: str) -> str:
    name = filename.strip()
    return name if name.endswith(".safetensors") else name + ".safetensors"


def predictor_filename_problem(filename) -> Optional[str]:
    """Why `filename` cannot name a new predictor in models/token_cache, or
    None. Checked before training starts, so a run is never lost to a name
    the file system refuses at the end."""
    accepted = "give a plain file name (letters, digits, - and _; no folders), e.g. flux_dev_predictor"
    if not isinstance(filename, str):
        return f"filename {filename!r} is not text; {accepted}"
    name = filename.strip()
    if not name or name.startswith(".") or any(sep in name for sep in ("/", "\\")):
        return f"filename {filename!r}: {accepted}"
    if any(ord(c) < 32 for c in name):
        return f"filename {filename!r} holds control characters; {accepted}"
    length = len(predictor_file_name(name).encode("utf-8"))
    if length > MAX_NAME_BYTES:
        return (f"filename is {length} bytes long with .safetensors; file systems accept at most {MAX_NAME_BYTES}: "
                "give a shorter name")
    return None


def predictor_files() -> list:
    return folder_paths.get_filename_list(FOLDER)


def load_for_model(model, name: str):
    """(predictor, calibration, LoRA adapters or None) from models/token_cache/<name>, checked against `model`."""
    adapter = adapter_for(model)
    path = folder_paths.get_full_path(FOLDER, name)
    if path is None:
        raise ValueError(f"TokenCache predictor {name!r} not found in {folder_paths.get_folder_paths(FOLDER)}; "
                         f"available: {', '.join(predictor_files()) or 'none'}")
    try:
        predictor, metadata = load_predictor(path, expect=predictor_expectations(adapter),
                                             first_block=adapter.predictor_parts)
        lora = load_lora(path, lambda: linear_layers(adapter.block_paths()), adapter.block_count)
    except PredictorFileError as error:
        raise ValueError(f"TokenCache predictor {name!r} cannot drive this model: {error}") from None
    return predictor, metadata.get("calibration"), lora


class TokenCacheNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenCache",
            display_name="TokenCache",
            category=CATEGORY,
            search_aliases=["token cache", "feature cache", "learned cache", "speed up", "accelerate",
                            "faster sampling", "cache"],
            description=("TokenCache: a learned predictor scores which tokens of which blocks must be recomputed; "
                         "full-compute I-steps go where the predicted importance accumulates, every other step "
                         "recomputes only the chosen tokens. Without a predictor, tokens whose block outputs "
                         "changed most between the last two computed steps are recomputed. Every family DuCa Cache supports."),
            inputs=[
                io.Model.Input("model", tooltip="The diffusion transformer to accelerate. The input model is not changed."),
                io.Combo.Input("predictor", options=[NO_PREDICTOR, *predictor_files()], default=NO_PREDICTOR,
                               tooltip="A predictor trained for this model (models/token_cache), or none for the "
                                       "training-free fallback. Its LoRA adapters, if it has them, refine the last "
                                       "blocks at P-steps."),
                io.Float.Input("cache_ratio", default=0.9, min=0.0, max=1.0, step=0.01,
                               tooltip="Share of (block, token) pairs that reuse the cache at a P-step, over all "
                                       "blocks but the protected last ones."),
                io.Int.Input("i_steps", default=4, min=1, max=1000,
                             tooltip="Steps of full compute inside the window (step 0 of the window is always one)."),
                io.Int.Input("protected_last_blocks", default=4, min=0, max=1000,
                             tooltip="The last K blocks always compute every token."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching starts at this point of the sampling schedule; earlier steps compute in full."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Caching ends at this point of the sampling schedule; later steps compute in full."),
                io.Combo.Input("i_step_placement", options=list(PLACEMENTS), default="measured",
                               tooltip="Where the I-steps go, from the predictor's calibration run: where the measured "
                                       "cost of reusing the cache accumulates, where the predicted importance does "
                                       "(the paper's rule), or evenly. Without a predictor: evenly."),
                io.Combo.Input("forecast", options=list(FORECASTS), default=TOKENCACHE_FORECAST, tooltip=FORECAST_TOOLTIP),
                *memory_inputs(),
            ],
            outputs=[io.Model.Output(tooltip="The model with TokenCache.")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, predictor, cache_ratio, i_steps, protected_last_blocks, start_percent,
                end_percent, i_step_placement="measured", forecast=TOKENCACHE_FORECAST,
                cache_precision=DEFAULT_PRECISION, cache_budget_gb=0.0) -> io.NodeOutput:
        config = CacheConfig(mode="tokencache", cache_ratio=cache_ratio, i_steps=i_steps,
                             protected_last_blocks=protected_last_blocks, start_percent=start_percent,
                             end_percent=end_percent, forecast=forecast, cache_precision=cache_precision,
                             cache_budget_gb=cache_budget_gb)
        learned, calibration, lora = (None, None, None) if predictor == NO_PREDICTOR else load_for_model(model, predictor)
        calibration = step_importance(calibration, i_step_placement)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        name = "TokenCache[fallback]" if learned is None else "TokenCache[learned+LoRA]" if lora else "TokenCache[learned]"
        return io.NodeOutput(apply_token_cache(model, config, name=name, node_id=node_id, predictor=learned,
                                               calibration=calibration, lora=lora))


class TokenCacheTrainPredictorNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TokenCacheTrainPredictor",
            display_name="TokenCache Train Predictor",
            category=CATEGORY,
            search_aliases=["train token cache", "token cache predictor", "cache predictor"],
            description=("Trains a TokenCache predictor on your model, prompts and sampler (the model stays frozen), "
                         "then LoRA adapters that refine the last blocks under caching (lora_rank), and writes both to "
                         "models/token_cache/<filename>.safetensors. Cancel stops it and writes nothing."),
            inputs=[
                io.Model.Input("model", tooltip="The model the predictor is for (any family DuCa Cache supports), without other caching."),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Latent.Input("latent_image", tooltip="Latents to sample from: their size and batch are the training data."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=io.ControlAfterGenerate.fixed,
                             tooltip="Noise seed of the first trajectory (each next one adds 1) and of the predictor's init."),
                io.Int.Input("steps", default=20, min=2, max=1000),
                io.Float.Input("cfg", default=4.0, min=0.0, max=100.0, step=0.1),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS),
                io.Int.Input("iterations", default=200, min=1, max=100000,
                             tooltip="Optimiser steps; a new sampling trajectory is recorded whenever the last one is used up."),
                io.Float.Input("learning_rate", default=0.001, min=1e-6, max=1.0, step=0.0001),
                io.Float.Input("cost_weight", default=0.05, min=0.0, max=10.0, step=0.001,
                               tooltip="lambda: price of recomputing a token; higher gives sparser scores."),
                io.String.Input("filename", default="my_model_predictor",
                                tooltip="Written as models/token_cache/<filename>.safetensors."),
                io.Combo.Input("architecture", options=list(ARCHITECTURES), default="first_block",
                               tooltip="first_block: a copy of the model's first block with a scoring head (the "
                                       "paper's; costs one block per cached step, file the size of one block). "
                                       "mlp_mixer: a small network, nearly free to run."),
                io.Combo.Input("objective", options=list(OBJECTIVES), default="chained",
                               tooltip="chained: reuse errors run through the model's blocks as at inference (the "
                                       "paper's; keeps every token's block outputs, backpropagates through the "
                                       "model). p_step: the same, with each block run as a P-step runs it "
                                       "(attention reused, only the MLP recomputed; the protected_last_blocks in "
                                       "full); about twice the memory. first_order: each block judged alone on a "
                                       "token sample; far less memory for large models."),
                io.Int.Input("lora_rank", default=DEFAULT_LORA_RANK, min=0, max=256, advanced=True,
                             tooltip="Then train LoRA adapters of this rank on the last protected_last_blocks blocks "
                                     "(model frozen) so they repair what caching costs, as in the paper; stored in "
                                     "the predictor file, applied by TokenCache at cached steps only. 0: no LoRA."),
                io.Float.Input("cache_ratio", default=0.9, min=0.0, max=1.0, step=0.01, advanced=True,
                               tooltip="The TokenCache setting the LoRA is trained under: use the TokenCache node's."),
                io.Int.Input("i_steps", default=4, min=1, max=1000, advanced=True,
                             tooltip="The TokenCache setting the LoRA is trained under: use the TokenCache node's."),
                io.Int.Input("protected_last_blocks", default=4, min=1, max=1000, advanced=True,
                             tooltip="The blocks that get the LoRA; the TokenCache node must protect at least these."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="Where the predictor was written.")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, filename):
        # a linked filename is validated with None: execute checks it again once it is known
        if filename is None:
            return True
        problem = predictor_filename_problem(filename)
        return problem or True

    @classmethod
    def execute(cls, model, positive, negative, latent_image, seed, steps, cfg, sampler_name, scheduler, iterations,
                learning_rate, cost_weight, filename, architecture="first_block", objective="chained",
                lora_rank=DEFAULT_LORA_RANK, cache_ratio=0.9, i_steps=4, protected_last_blocks=4) -> io.NodeOutput:
        problem = predictor_filename_problem(filename)
        if problem:
            raise ValueError(problem)
        settings = TrainingSettings(seed=seed, steps=steps, cfg=cfg, sampler_name=sampler_name, scheduler=scheduler,
                                    iterations=iterations, learning_rate=learning_rate, cost_weight=cost_weight,
                                    architecture=architecture, objective=objective, lora_rank=lora_rank,
                                    cache_ratio=cache_ratio, i_steps=i_steps, protected_last_blocks=protected_last_blocks)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None
        bar = comfy.utils.ProgressBar(iterations * (2 if settings.lora_rank else 1))

        def progress(done, total, loss):
            bar.update_absolute(done, total)
            if done == total or done % max(1, total // 20) == 0:
                text = f"TokenCache training: iteration {done}/{total}, loss {loss:.4f}"
                if settings.lora_rank and done > iterations:
                    text += " (LoRA)"
                logging.info(text)
                show_on_node(node_id, text)

        def notify(text):
            logging.info(text)
            show_on_node(node_id, text)

        predictor, metadata, lora = train_with_refinement(model, positive, negative, latent_image, settings, progress,
                                                          notify)
        path = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], predictor_file_name(filename))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_predictor(path, predictor, metadata, lora)
        return io.NodeOutput(path)


TOKENCACHE_NODES = [TokenCacheNode, TokenCacheTrainPredictorNode]
