"""TokenCache predictor files: safetensors weights plus the metadata that says
what the predictor was trained for. Never pickle: a predictor file may come
from anywhere, and safetensors cannot run code when loaded.

Every metadata value is stored JSON-encoded (safetensors metadata is str -> str),
strings included, so that each value reads back with its own type.
"""
import json
import math
import os
import struct
import tempfile
from typing import Callable, Optional, Tuple

import safetensors
import safetensors.torch
import torch

from .lora import TENSOR_PREFIX as LORA_PREFIX, BlockLoRA, LoRASpec
from .tokencache import CachePredictor, FirstBlockPredictor

FORMAT = "tokencache-predictor"
FORMAT_VERSION = 1
# what the caller must describe; "format", "format_version" and "predictor"
# (the constructor config) are written by save_predictor itself
METADATA_KEYS = ("family", "hidden_size", "blocks", "block_counts", "token_layout", "training", "calibration")
_MAX_HEADER = 100 * 2**20   # the safetensors format's own header limit


class PredictorFileError(ValueError):
    """A predictor file that cannot be used: unreadable, not a predictor, or made for another model."""


def save_predictor(path: str, predictor, metadata: dict, lora: Optional[BlockLoRA] = None) -> None:
    """Write weights and metadata atomically: a temp file in the same folder,
    then os.replace, so an interrupted save never leaves a half file at `path`.
    `lora`: the refinement adapters of the last blocks, stored beside the
    predictor (tensors lora.*, metadata "lora" says rank and layers)."""
    missing = [key for key in METADATA_KEYS if key not in metadata]
    if missing:
        raise ValueError(f"save_predictor: metadata lacks {', '.join(missing)}; "
                         f"expected keys {', '.join(METADATA_KEYS)}")
    config = {**predictor.config(), "architecture": predictor.architecture}
    for key, config_key in (("hidden_size", "hidden_size"), ("blocks", "n_blocks")):
        if metadata[key] != config[config_key]:
            raise ValueError(f"save_predictor: metadata {key}={metadata[key]!r} but the predictor has "
                             f"{config_key}={config[config_key]!r}")
    fields = {**metadata, "format": FORMAT, "format_version": FORMAT_VERSION, "predictor": config}
    if lora is not None:
        fields["lora"] = lora.spec.to_metadata()
    encoded = {}
    for key, value in fields.items():
        try:
            encoded[str(key)] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"save_predictor: metadata {key!r} is not JSON-serialisable ({error})") from None
    tensors = {name: tensor.detach().to("cpu").contiguous() for name, tensor in predictor.state_dict().items()}
    if lora is not None:
        tensors.update(lora.tensors())
    data = safetensors.torch.save(tensors, metadata=encoded)
    folder = os.path.dirname(os.path.abspath(path))
    fd, temp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temp, 0o666 & ~umask)   # mkstemp makes it private; a predictor is shared like a model file
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        os.unlink(temp)
        raise


def _read_header(path: str) -> dict:
    """The safetensors JSON header, after checking the file is whole."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise PredictorFileError(f"{name}: no such file (expected a TokenCache predictor .safetensors file)")
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        start = handle.read(8)
        if len(start) < 8:
            raise PredictorFileError(f"{name}: {size} bytes, too short to be a safetensors file "
                                     "(expected a TokenCache predictor .safetensors file)")
        (length,) = struct.unpack("<Q", start)
        if length > _MAX_HEADER or 8 + length > size:
            raise PredictorFileError(f"{name}: not a safetensors file, or truncated (its first 8 bytes announce "
                                     f"a {length}-byte header in a {size}-byte file; expected a TokenCache "
                                     "predictor .safetensors file)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        header = None
    if not isinstance(header, dict):
        raise PredictorFileError(f"{name}: not a safetensors file (its header is not JSON; expected a "
                                 "TokenCache predictor .safetensors file)")
    try:
        expected = max((int(entry["data_offsets"][1]) for key, entry in header.items() if key != "__metadata__"),
                       default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise PredictorFileError(f"{name}: not a safetensors file (its header does not describe tensors; "
                                 "expected a TokenCache predictor .safetensors file)") from None
    if size - 8 - length != expected:
        raise PredictorFileError(f"{name}: truncated or damaged: its data section holds {size - 8 - length} bytes "
                                 f"where the header describes {expected}; save or copy the file again")
    return header


def _decode_metadata(name: str, header: dict) -> dict:
    raw = header.get("__metadata__") or {}
    if "format" not in raw:
        raise PredictorFileError(f"{name}: a safetensors file but not a TokenCache predictor (no 'format' entry "
                                 f"in its metadata; expected format {FORMAT!r}). Is it a model or LoRA file?")
    metadata = {}
    for key, value in raw.items():
        try:
            metadata[key] = json.loads(value)
        except ValueError:
            raise PredictorFileError(f"{name}: metadata {key!r} is not JSON ({value[:60]!r}); "
                                     "expected a file written by save_predictor") from None
    if metadata["format"] != FORMAT:
        raise PredictorFileError(f"{name}: format {metadata['format']!r}, expected {FORMAT!r}")
    version = metadata.get("format_version")
    if version is None:
        raise PredictorFileError(f"{name}: no format_version in its metadata; expected format_version {FORMAT_VERSION}")
    if version != FORMAT_VERSION:
        raise PredictorFileError(f"{name}: format_version {version!r}, this version of the pack reads "
                                 f"format_version {FORMAT_VERSION}; retrain or convert the predictor")
    missing = [key for key in METADATA_KEYS + ("predictor",) if key not in metadata]
    if missing:
        raise PredictorFileError(f"{name}: metadata lacks {', '.join(missing)}; a predictor file holds "
                                 f"{', '.join(METADATA_KEYS + ('predictor',))}")
    return metadata


CALIBRATION_CURVES = ("measured", "predicted", "importance")   # "importance": files from before the other two


def _check_calibration(name: str, calibration) -> None:
    """A calibration is None or {"sigmas": [...], <curve>: [...], ...}, one
    finite value >= 0 per sigma: checked here so a bad file is refused at
    load, not by an IndexError in the middle of sampling."""
    if calibration is None:
        return
    if not isinstance(calibration, dict):
        raise PredictorFileError(f"{name}: metadata 'calibration' is a {type(calibration).__name__}; expected "
                                 "null or an object with 'sigmas' and one list per curve")

    def numbers(field):
        values = calibration[field]
        if not isinstance(values, list) or not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise PredictorFileError(f"{name}: calibration field {field!r} must be a non-empty list of finite "
                                     f"numbers, got {str(values)[:80]}")
        return values

    if "sigmas" not in calibration:
        raise PredictorFileError(f"{name}: calibration field 'sigmas' is missing; expected 'sigmas' and one or "
                                 f"more of {', '.join(CALIBRATION_CURVES)}")
    sigmas = numbers("sigmas")
    curves = [key for key in calibration if key != "sigmas"]
    unknown = [key for key in curves if key not in CALIBRATION_CURVES]
    if unknown or not curves:
        raise PredictorFileError(f"{name}: calibration fields {', '.join(map(repr, unknown)) or '(none)'} besides "
                                 f"'sigmas'; accepted: {', '.join(CALIBRATION_CURVES)}")
    for key in curves:
        values = numbers(key)
        if len(values) != len(sigmas):
            raise PredictorFileError(f"{name}: calibration field {key!r} has {len(values)} values for "
                                     f"{len(sigmas)} sigmas; expected one per sigma")
        if min(values) < 0:
            raise PredictorFileError(f"{name}: calibration field {key!r} has a negative value ({min(values)}); "
                                     "importance is >= 0")


PLACEMENTS = ("measured", "predicted", "even")   # where TokenCache's I-steps go (the node's i_step_placement)


def step_importance(calibration, placement: str):
    """The calibration curve {"sigmas", "importance"} the I-steps are placed by:
    the measured reuse cost, the predictor's mean predicted importance, or none
    (even spacing). Files from before "predicted" existed hold the measured
    cost as "importance"."""
    if placement not in PLACEMENTS:
        raise ValueError(f"i_step_placement={placement!r}; accepted: {', '.join(PLACEMENTS)}")
    if placement == "even" or not calibration:
        return None
    values = calibration.get(placement, calibration.get("importance") if placement == "measured" else None)
    if values is None:
        raise ValueError(f"i_step_placement={placement!r}: this predictor file has no {placement} calibration; "
                         f"use {' or '.join(k for k in PLACEMENTS if k != placement)}, or retrain it")
    return {"sigmas": calibration["sigmas"], "importance": values}


def _describe(values: dict, keys) -> str:
    def first(value):
        return value[0] if isinstance(value, tuple) else value
    return ", ".join(f"{key}={first(values.get(key, '(not recorded)'))!r}" for key in keys)


def load_predictor(path: str, expect: Optional[dict] = None,
                   first_block: Optional[Callable[[], tuple]] = None,
                   block_tensors: Optional[Callable[[dict], dict]] = None) -> Tuple[object, dict]:
    """(predictor on the CPU, metadata). `expect` (e.g. {"family": "flux",
    "hidden_size": 3072, "blocks": 57}) describes the model it will run on; a
    file trained for anything else is refused, naming both. A first-block
    predictor is rebuilt around `first_block()` -> (a copy of the model's
    first block, its runner, its kind), whose weights the file replaces;
    `block_tensors` renames the file's block tensors (relative to the block)
    to that copy's, where the file was written by another host (ComfyUI's
    Flux block for diffusers' Flux)."""
    name = os.path.basename(path)
    metadata = _decode_metadata(name, _read_header(path))
    expect = expect or {}
    # a tuple in `expect` lists the values accepted
    wrong = [key for key, value in expect.items()
             if metadata.get(key) not in (value if isinstance(value, tuple) else (value,))]
    if wrong:
        keys = list(expect)
        raise PredictorFileError(f"{name}: trained for {_describe(metadata, keys)}, but this model is "
                                 f"{_describe(expect, keys)}; train a predictor for this model")
    config = metadata["predictor"]
    if not isinstance(config, dict) or config.get("hidden_size") != metadata["hidden_size"] \
            or config.get("n_blocks") != metadata["blocks"]:
        raise PredictorFileError(f"{name}: predictor settings {config!r} disagree with hidden_size="
                                 f"{metadata['hidden_size']!r}, blocks={metadata['blocks']!r}")
    _check_calibration(name, metadata["calibration"])
    architecture = config.get("architecture", CachePredictor.architecture)
    try:
        tensors = safetensors.torch.load_file(path, device="cpu")
        tensors = {key: value for key, value in tensors.items() if not key.startswith(LORA_PREFIX)}
        broken = [key for key, tensor in tensors.items()
                  if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
        if broken:
            raise PredictorFileError(f"{name}: weights {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} "
                                     "hold NaN or infinite values (a diverged training run?); retrain the predictor, "
                                     "with a lower learning_rate")
        if architecture == FirstBlockPredictor.architecture:
            if first_block is None:
                raise PredictorFileError(f"{name}: a first-block predictor; it runs only with its model")
            block, runner, kind = first_block()
            if kind != config.get("block_kind"):
                raise PredictorFileError(f"{name}: its first block is a {config.get('block_kind')!r} block, "
                                         f"this model's is {kind!r}")
            predictor = FirstBlockPredictor(block, runner, **{k: v for k, v in config.items() if k != "architecture"})
            if block_tensors is not None:
                prefix = "block."
                renamed = block_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
                tensors = {**{k: v for k, v in tensors.items() if not k.startswith(prefix)},
                           **{prefix + k: v for k, v in renamed.items()}}
            predictor.load_state_dict(tensors, strict=True)
        elif architecture == CachePredictor.architecture:
            # built on the meta device so loading neither draws from the global RNG
            # nor spends time on an initialisation the file overwrites
            with torch.device("meta"):
                predictor = CachePredictor(**{k: v for k, v in config.items() if k != "architecture"})
            predictor.load_state_dict(tensors, strict=True, assign=True)
        else:
            raise PredictorFileError(f"{name}: predictor architecture {architecture!r}; this version of the pack "
                                     f"reads {FirstBlockPredictor.architecture}, {CachePredictor.architecture}")
    except (RuntimeError, TypeError, ValueError, KeyError, OSError, safetensors.SafetensorError) as error:
        if isinstance(error, PredictorFileError):
            raise
        raise PredictorFileError(f"{name}: its weights do not fit the predictor it describes ({config!r}): "
                                 f"{error}") from None
    return predictor.eval(), metadata


def load_lora(path: str, layer_shapes: Callable[[], dict], blocks: int) -> Optional[BlockLoRA]:
    """The refinement adapters of a predictor file, or None where it has none.
    `layer_shapes()` -> {layer path: (in, out)} of the model's linear layers
    (accel_core.lora.linear_layers); adapters for layers the model lacks, or
    of another shape, or for blocks beyond `blocks`, are refused naming them."""
    name = os.path.basename(path)
    metadata = _decode_metadata(name, _read_header(path))
    if metadata.get("lora") is None:
        return None
    try:
        spec = LoRASpec.from_metadata(metadata["lora"])
        outside = [b for b in spec.blocks if not 0 <= b < blocks]
        if outside:
            raise ValueError(f"adapters for blocks {outside} of a model with {blocks} blocks")
        lora = BlockLoRA(spec, layer_shapes())
        with safetensors.safe_open(path, framework="pt", device="cpu") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys() if key.startswith(LORA_PREFIX)}
        broken = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
        if broken:
            raise ValueError(f"adapter weights {', '.join(broken[:3])} hold NaN or infinite values")
        lora.load_tensors(tensors)
    except (ValueError, TypeError, RuntimeError, safetensors.SafetensorError) as error:
        raise PredictorFileError(f"{name}: its LoRA adapters do not fit this model: {error}; use the predictor "
                                 "with the model it was trained on, or retrain it") from None
    return lora.eval().requires_grad_(False)
