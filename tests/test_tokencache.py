"""TokenCache on a tiny Flux through ComfyUI's real sampling path: training
lowers the loss, the predictor file round-trips and is checked against the
model, the learned plan differs from the training-free fallback and does the
work its ratio asks for, bad files are refused, and the run lifecycle holds
(CFG batched/split, determinism, cancel)."""
import gc
import json
import os
import re
import weakref

import pytest
import torch

import comfy.model_management
import comfy.utils
import tiny_models

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.predictor_file import load_predictor, save_predictor
from dit_token_cache.accel_core.schedule import StepKind
from dit_token_cache.accel_core.tokencache import allocate_tokens, chained_reuse_loss, importance_curve, place_i_steps
from dit_token_cache.nodes.families import adapter_for
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache
from dit_token_cache.nodes.duca_node import DEFAULT_PRECISION
from dit_token_cache.nodes.predictor_training import (TrainingSettings, _differentiable_ops, _pairs, _recorded,
                                                      check_training_memory, record_trajectory, recorded_bytes,
                                                      train_predictor,
                                                      trajectory_bytes)
from dit_token_cache.nodes.tokencache_nodes import TokenCacheNode, TokenCacheTrainPredictorNode, step_importance

FAMILY = "flux_schnell"
STEPS = 8
SAMPLING = dict(steps=STEPS, cfg=2.0, seed=3, width=64, height=64)
TRAINING = dict(seed=0, steps=6, cfg=2.0, iterations=30, learning_rate=3e-3, cost_weight=0.05)
NO_LORA = dict(lora_rank=0)   # the node's LoRA refinement has its own tests (test_tokencache_lora.py)


@pytest.fixture(scope="module")
def flux(tiny_model):
    return tiny_model(FAMILY)


def _inputs(model):
    positive, negative = tiny_models.conditioning(FAMILY, model)
    return positive, negative, tiny_models.empty_latent(FAMILY, 64, 64)


@pytest.fixture(scope="module")
def trained(flux, predictor_dir):
    positive, negative, latent = _inputs(flux)
    (path,) = TokenCacheTrainPredictorNode.execute(flux, positive, negative, latent, filename="tiny_flux", sampler_name="euler",
                                                   scheduler="simple", **TRAINING, **NO_LORA).result
    return path


def _load(model, path):
    return load_predictor(path, first_block=adapter_for(model).predictor_parts)


def _run(model, predictor="none", cache_ratio=0.75, i_steps=3, protected_last_blocks=1, placement="measured",
         precision="model", **kw):
    # the cache at the model's precision: runs here compare to float rounding (the node's default, bf16, is
    # checked in test_deterministic_and_cfg_batched_equals_split)
    (patched,) = TokenCacheNode.execute(model, predictor, cache_ratio, i_steps, protected_last_blocks, 0.0, 1.0,
                                        placement, cache_precision=precision).result
    out = tiny_models.sample(patched, FAMILY, **{**SAMPLING, **kw})
    return out, patched.model_options["transformer_options"][SETTINGS_KEY].last_run


def test_training_lowers_the_loss_and_the_file_round_trips(flux, trained):
    assert os.path.basename(trained) == "tiny_flux.safetensors"
    predictor, metadata = _load(flux, trained)
    training = metadata["training"]
    assert training["final_loss"] < training["first_loss"], training
    assert metadata["family"] == "flux" and metadata["blocks"] == 4
    assert metadata["predictor"]["architecture"] == "first_block" and training["objective"] == "chained"
    calibration = metadata["calibration"]
    # one measured reuse error and one mean predicted score per step after the first
    assert len(calibration["sigmas"]) == len(calibration["measured"]) == len(calibration["predicted"]) == TRAINING["steps"] - 1
    # the same settings train the same predictor
    positive, negative, latent = _inputs(flux)
    again, _ = train_predictor(flux, positive, negative, latent, TrainingSettings(**TRAINING))
    for (name, a), b in zip(predictor.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_learned_plan_differs_from_fallback_and_does_the_asked_work(flux, trained):
    base = tiny_models.sample(flux, FAMILY, **SAMPLING)
    learned, learned_run = _run(flux, "tiny_flux.safetensors")
    fallback, fallback_run = _run(flux)
    assert not learned_run.stats.notes and not fallback_run.stats.notes
    tokens = 16 + 16                     # text + image tokens of a 64x64 tiny Flux
    blocks, protected = 4, 1
    counts = learned_run.stats.counts()
    assert counts["full"] == 3 and counts["conservative"] == STEPS - 3 and counts["aggressive"] == 0
    recomputed = round(0.25 * tokens * (blocks - protected)) + protected * tokens
    expected = (3 + (STEPS - 3) * recomputed / (blocks * tokens)) / STEPS
    for run in (learned_run, fallback_run):
        assert run.stats.token_fraction == pytest.approx(expected)
    # the same budget, spent on other (block, token) pairs
    assert any(not torch.equal(learned_run.last_selection[b], fallback_run.last_selection[b]) for b in range(blocks - protected))
    for out in (learned, fallback):
        assert torch.isfinite(out).all() and 0 < float((out - base).norm() / base.norm()) < 0.5
    # the protected last block computes in full at P-steps: it never selects tokens
    for run in (learned_run, fallback_run):
        assert sorted(run.last_selection) == list(range(blocks - protected))
    # the fallback spreads the I-steps evenly; the learned run places them by its calibration
    assert _full_steps(fallback_run) == [0, 3, 6]
    calibration = _load(flux, trained)[1]["calibration"]
    importance = importance_curve({"sigmas": calibration["sigmas"], "importance": calibration["measured"]})
    sigmas = learned_run.schedule.sigmas[:STEPS]
    assert _full_steps(learned_run) == place_i_steps([importance(s) for s in sigmas], 3)
    # the predictor's work counts: a copy of the first block, once per P-step on the first cond's row
    predictor = learned_run.planner.predictor
    assert learned_run.stats.predictor_flops == pytest.approx((STEPS - 3) * predictor.flops(tokens))
    assert predictor.flops(tokens) > adapter_for(flux).double_mlp_flops * tokens
    assert fallback_run.stats.predictor_flops == 0


def test_learned_selection_is_the_allocation_of_the_predictor_scores(flux, trained):
    """Independently of the planner: the scores the predictor gave at the last
    P-step (right after an I-step: no token is stale), averaged over the
    batch, ranked within each block and allocated under the global ratio,
    are the tokens every block recomputed."""
    (patched,) = TokenCacheNode.execute(flux, "tiny_flux.safetensors", 0.75, 3, 1, 0.0, 1.0, "measured").result
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    predictor = settings.planner_args[1]
    scores = []
    handle = predictor.register_forward_hook(lambda module, args, output: scores.append(output.detach()))
    try:
        tiny_models.sample(patched, FAMILY, **SAMPLING)
    finally:
        handle.remove()
    run = settings.last_run
    assert len(scores) == STEPS - 3                     # once per P-step, shared by cond and uncond
    assert _full_steps(run)[-1] == STEPS - 2            # the last P-step follows an I-step
    last = scores[-1].mean(dim=0)
    rank = last.argsort(dim=1, stable=True).argsort(dim=1).float() / (last.shape[1] - 1)
    expected, _ = allocate_tokens(rank, 0.75, 1)
    for block, index in run.last_selection.items():
        assert torch.equal(index, expected[block]), block


def test_fallback_scores_by_output_change_once_two_steps_were_computed(flux):
    """The last P-step (step 7) follows full steps 3 and 6: its tokens come from
    how block outputs changed between them, not from the random scores used
    before two full steps exist."""
    config = CacheConfig(mode="tokencache", cache_ratio=0.75, i_steps=3, protected_last_blocks=1)
    runs = {}
    for fallback in ("change", "random"):
        patched = apply_token_cache(flux, config, fallback=fallback)
        tiny_models.sample(patched, FAMILY, **SAMPLING)
        runs[fallback] = patched.model_options["transformer_options"][SETTINGS_KEY].last_run
    assert _full_steps(runs["change"]) == [0, 3, 6]
    assert any(not torch.equal(runs["change"].last_selection[b], runs["random"].last_selection[b]) for b in range(3))


def test_calibration_places_the_i_steps(flux):
    """Importance concentrated at high noise draws the I-steps to the start."""
    calibration = {"sigmas": [1.0, 0.7, 0.0], "importance": [1.0, 1.0, 0.0]}
    patched = apply_token_cache(flux, CacheConfig(mode="tokencache", cache_ratio=0.75, i_steps=3, protected_last_blocks=1),
                                calibration=calibration)
    tiny_models.sample(patched, FAMILY, **SAMPLING)
    run = patched.model_options["transformer_options"][SETTINGS_KEY].last_run
    importance = importance_curve(calibration)
    expected = place_i_steps([importance(s) for s in run.schedule.sigmas[:STEPS]], 3)
    assert _full_steps(run) == expected and expected != [0, 3, 6]


def test_i_step_placement_reads_the_chosen_calibration(flux, trained, predictor_dir):
    """A copy of the trained file whose two calibrations disagree: measured
    cost early, predicted importance late; the node follows the one chosen."""
    predictor, metadata = _load(flux, trained)
    metadata["calibration"] = {"sigmas": [1.0, 0.5, 0.0], "measured": [1.0, 0.0, 0.0], "predicted": [0.0, 0.0, 1.0]}
    save_predictor(str(predictor_dir / "two_curves.safetensors"), predictor, metadata)
    placed = {}
    for placement in ("measured", "predicted", "even"):
        _, run = _run(flux, "two_curves.safetensors", placement=placement)
        placed[placement] = _full_steps(run)
        if placement != "even":
            importance = importance_curve({"sigmas": [1.0, 0.5, 0.0], "importance": metadata["calibration"][placement]})
            assert placed[placement] == place_i_steps([importance(s) for s in run.schedule.sigmas[:STEPS]], 3)
    assert placed["even"] == [0, 3, 6] and len({tuple(steps) for steps in placed.values()}) == 3, placed
    # a file from before "predicted" existed holds the measured cost as "importance"
    assert step_importance({"sigmas": [1.0], "importance": [0.5]}, "measured") == {"sigmas": [1.0], "importance": [0.5]}
    with pytest.raises(ValueError, match="no predicted calibration"):
        step_importance({"sigmas": [1.0], "importance": [0.5]}, "predicted")
    with pytest.raises(ValueError, match="accepted: measured, predicted, even"):
        step_importance(metadata["calibration"], "paper")


def test_first_block_predictor_starts_as_a_copy_of_the_first_block(flux):
    positive, negative, latent = _inputs(flux)
    predictor, _ = train_predictor(flux, positive, negative, latent,
                                   TrainingSettings(**{**TRAINING, "iterations": 1, "learning_rate": 1e-9}))
    block = flux.model.diffusion_model.double_blocks[0].state_dict()
    copied = predictor.block.state_dict()
    assert copied.keys() == block.keys()
    for name, tensor in block.items():
        torch.testing.assert_close(copied[name], tensor.float(), rtol=0, atol=1e-6, msg=name)
    assert copied["img_attn.qkv.weight"].data_ptr() != block["img_attn.qkv.weight"].data_ptr()


def test_chained_objective_runs_the_model_blocks(flux):
    """Recomputing every token through the model's own blocks reproduces the
    recorded full run; reusing every token costs what the recorded stale
    contributions cost once they run through the later blocks."""
    positive, negative, latent = _inputs(flux)
    adapter = adapter_for(flux)
    evaluations, _ = _recorded(flux, positive, negative, latent, TrainingSettings(**TRAINING), seed=5)
    previous, current = _pairs(evaluations)[2]
    start = current.inputs.tokens
    target = start + current.deltas.sum(dim=1)
    txt_len = current.inputs.block_args["txt"].shape[1]

    def run_block(block_id, x):
        return adapter.block_contribution(block_id, x, current.block_args[block_id], txt_len, start.dtype)
    with torch.inference_mode(False), torch.enable_grad():
        shape = current.deltas.shape[:3]
        _, recompute = chained_reuse_loss(torch.ones(shape), start, run_block, previous.deltas, target, 0.0)
        _, reuse = chained_reuse_loss(torch.zeros(shape), start, run_block, previous.deltas, target, 0.0)
    assert recompute["error"].item() < 1e-10
    # the gradient reaches a block-0 score through every later block: autograd agrees with a finite difference
    with torch.inference_mode(False), torch.enable_grad(), _differentiable_ops():
        scores = torch.full(shape, 0.5, dtype=torch.float64).requires_grad_(True)
        loss, _ = chained_reuse_loss(scores, start, run_block, previous.deltas, target, 0.0)
        (grad,) = torch.autograd.grad(loss, scores)
        nudged = scores.detach().clone()
        nudged[:, 0] += 1e-2
        moved, _ = chained_reuse_loss(nudged, start, run_block, previous.deltas, target, 0.0)
    assert float(moved - loss.detach()) == pytest.approx(1e-2 * float(grad[:, 0].sum()), rel=0.05)
    stale = start + previous.deltas.sum(dim=1)
    expected = (stale - target).pow(2).sum(-1).mean() / (target - start).pow(2).sum(-1).mean()
    assert reuse["error"].item() == pytest.approx(expected.item(), rel=1e-4) and expected > 1e-4


@pytest.mark.parametrize("architecture, objective", [("mlp_mixer", "chained"), ("first_block", "first_order"),
                                                     ("mlp_mixer", "first_order")])
def test_other_architectures_and_objectives_train(flux, architecture, objective):
    positive, negative, latent = _inputs(flux)
    predictor, metadata = train_predictor(flux, positive, negative, latent,
                                          TrainingSettings(**TRAINING, architecture=architecture, objective=objective))
    training = metadata["training"]
    assert predictor.architecture == architecture and training["final_loss"] < training["first_loss"], training


def test_training_settings_are_checked(flux):
    positive, negative, latent = _inputs(flux)
    with pytest.raises(ValueError, match="objective='second_order'; accepted: chained, p_step, first_order"):
        train_predictor(flux, positive, negative, latent, TrainingSettings(objective="second_order"))


def _full_steps(run):
    return [k for k, kind in enumerate(run.schedule.kinds) if kind is StepKind.FULL]


def test_deterministic_and_cfg_batched_equals_split(flux, trained):
    first, _ = _run(flux, "tiny_flux.safetensors")
    second, _ = _run(flux, "tiny_flux.safetensors")
    assert torch.equal(first, second)
    with tiny_models.split_cfg(flux):
        split, split_run = _run(flux, "tiny_flux.safetensors")
        split_fallback, _ = _run(flux)
    assert split_run.stats.evaluations == 2 * STEPS
    torch.testing.assert_close(split, first, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(split_fallback, _run(flux)[0], rtol=1e-4, atol=1e-4)
    # the node's default stores the cache in bf16: run to run exact, batched and split alike to bf16's rounding
    default_precision, _ = _run(flux, "tiny_flux.safetensors", precision=DEFAULT_PRECISION)
    assert DEFAULT_PRECISION == "bf16" and torch.equal(default_precision, _run(flux, "tiny_flux.safetensors",
                                                                                precision=DEFAULT_PRECISION)[0])
    with tiny_models.split_cfg(flux):
        default_split, _ = _run(flux, "tiny_flux.safetensors", precision=DEFAULT_PRECISION)
    assert float((default_split - default_precision).norm() / default_precision.norm()) < 1e-3


def test_run_state_is_reset_after_an_error(flux, trained):
    (patched,) = TokenCacheNode.execute(flux, "tiny_flux.safetensors", 0.75, 3, 1, 0.0, 1.0, "measured").result
    settings = patched.model_options["transformer_options"][SETTINGS_KEY]
    with pytest.raises(RuntimeError, match="boom"):
        tiny_models.sample(tiny_models.failing_clone(patched), FAMILY, **SAMPLING)
    assert settings.active_run is None
    out, _ = _run(flux, "tiny_flux.safetensors")
    assert torch.equal(out, _run(flux, "tiny_flux.safetensors")[0])


def _expect_refused(flux, name, *fragments):
    with pytest.raises(ValueError) as error:
        TokenCacheNode.execute(flux, name, 0.9, 4, 1, 0.0, 1.0, "measured")
    message = str(error.value)
    assert name in message and all(f in message for f in fragments), message


def test_bad_predictor_files_are_refused(flux, trained, predictor_dir, model_dir):
    # a predictor trained for another model (more blocks)
    other = tiny_models.load(FAMILY, tiny_models.build_checkpoint(FAMILY, model_dir / f"{FAMILY}_deeper.safetensors", depth=3))
    positive, negative, latent = _inputs(other)
    TokenCacheTrainPredictorNode.execute(other, positive, negative, latent, filename="deeper", sampler_name="euler",
                                         scheduler="simple", **{**TRAINING, "iterations": 2}, **NO_LORA)
    _expect_refused(flux, "deeper.safetensors", "trained for", "blocks=5", "blocks=4")
    # wrong metadata: an unknown format version
    data = open(trained, "rb").read()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    header["__metadata__"]["format_version"] = "99"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (predictor_dir / "future.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_length:])
    _expect_refused(flux, "future.safetensors", "format_version")
    # truncated, and not a safetensors file at all
    (predictor_dir / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    _expect_refused(flux, "truncated.safetensors", "truncated")
    (predictor_dir / "pickle.safetensors").write_bytes(b"\x80\x04\x95not a safetensors file")
    _expect_refused(flux, "pickle.safetensors")
    _expect_refused(flux, "missing.safetensors", "not found")
    # and the model still samples normally afterwards
    assert torch.isfinite(_run(flux, "tiny_flux.safetensors")[0]).all()


def _with_metadata(path, target, **changes):
    """A copy of predictor file `path` at `target` with metadata fields replaced (JSON-encoded)."""
    data = open(path, "rb").read()
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + header_length])
    header["__metadata__"].update({key: json.dumps(value) for key, value in changes.items()})
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    target.write_bytes(len(text).to_bytes(8, "little") + text + data[8 + header_length:])


def test_inconsistent_calibration_and_broken_weights_are_refused_at_load(flux, trained, predictor_dir):
    good = _load(flux, trained)[1]["calibration"]
    short = {**good, "measured": good["measured"][:-1]}
    _with_metadata(trained, predictor_dir / "short_curve.safetensors", calibration=short)
    _expect_refused(flux, "short_curve.safetensors", "calibration field 'measured'", "values for")
    _with_metadata(trained, predictor_dir / "no_sigmas.safetensors", calibration={"measured": good["measured"]})
    _expect_refused(flux, "no_sigmas.safetensors", "'sigmas' is missing")
    _with_metadata(trained, predictor_dir / "nan_curve.safetensors", calibration={**good, "predicted": [None] * len(good["sigmas"])})
    _expect_refused(flux, "nan_curve.safetensors", "calibration field 'predicted'", "finite")
    # NaN weights, as a diverged training run leaves them
    predictor, metadata = _load(flux, trained)
    with torch.no_grad():
        next(predictor.parameters()).fill_(float("nan"))
    save_predictor(str(predictor_dir / "nan_weights.safetensors"), predictor, metadata)
    _expect_refused(flux, "nan_weights.safetensors", "NaN", "retrain")


def test_training_file_name_is_checked_before_training(flux, predictor_dir):
    assert TokenCacheTrainPredictorNode.validate_inputs(filename=None) is True   # linked: checked in execute
    assert TokenCacheTrainPredictorNode.validate_inputs(filename="my_predictor") is True
    for bad, says in (("../../escaped", "plain file name"), ("a\x00b", "control characters"),
                      ("x" * 250, "at most 255"), (".hidden", "plain file name"), ("", "plain file name")):
        assert says in TokenCacheTrainPredictorNode.validate_inputs(filename=bad), bad
    positive, negative, latent = _inputs(flux)
    started = []
    comfy.utils.set_progress_bar_global_hook(lambda *args, **kwargs: started.append(args))
    try:
        with pytest.raises(ValueError, match="plain file name"):
            TokenCacheTrainPredictorNode.execute(flux, positive, negative, latent, filename="../../escaped",
                                                 sampler_name="euler", scheduler="simple", **TRAINING)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert not started   # refused before the first iteration
    assert not list(predictor_dir.parent.rglob("escaped*"))


def test_settings_that_turn_caching_off_say_so_on_the_node(flux):
    _, run = _run(flux, i_steps=STEPS)
    assert run.stats.counts()["conservative"] == 0
    headline = run.stats.headline("TokenCache")
    assert f"caching is off: i_steps={STEPS} covers all {STEPS} steps" in headline, headline
    blocks = adapter_for(flux).block_count
    _, run = _run(flux, protected_last_blocks=blocks)
    assert f"protected_last_blocks={blocks} covers all {blocks} blocks" in run.stats.headline("TokenCache")
    _, run = _run(flux, protected_last_blocks=blocks - 1)
    assert not run.stats.warnings


def test_cancel_stops_training_and_writes_nothing(flux, predictor_dir):
    positive, negative, latent = _inputs(flux)

    def cancel_after_first(value, total, preview=None, node_id=None):
        # the first update always reaches the hook (later ones are throttled)
        if value == 1:
            comfy.model_management.interrupt_current_processing(True)
    comfy.utils.set_progress_bar_global_hook(cancel_after_first)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            TokenCacheTrainPredictorNode.execute(flux, positive, negative, latent, filename="cancelled",
                                                 sampler_name="euler", scheduler="simple", **TRAINING, **NO_LORA)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
        comfy.model_management.interrupt_current_processing(False)
    assert not any(p.name.startswith("cancelled") or p.name.startswith(".cancelled") for p in predictor_dir.iterdir())


def test_training_memory_is_estimated_and_a_setting_that_does_not_fit_is_refused(flux):
    positive, negative, latent = _inputs(flux)
    settings = TrainingSettings(**TRAINING)
    evaluations, _ = _recorded(flux, positive, negative, latent, settings, seed=5)
    rows_per_step = 2    # one latent, cond and uncond
    kept = sum(recorded_bytes(e) for e in evaluations)
    # the estimate from the first evaluation is what the whole trajectory keeps, most of it the block outputs:
    # steps x rows x blocks x tokens x hidden values
    estimate = trajectory_bytes(evaluations[0], settings, rows_per_step)
    assert estimate == pytest.approx(kept, rel=0.01)
    adapter = adapter_for(flux)
    block_outputs = 6 * rows_per_step * adapter.block_count * 32 * adapter.hidden * evaluations[0].deltas.element_size()
    assert block_outputs < estimate < 2 * block_outputs   # the rest: the first block's inputs, positions
    text = check_training_memory(evaluations[0], settings, rows_per_step, free_bytes=2**40)
    assert re.search(r"about [0-9.]+ GiB of block outputs per trajectory \(6 steps x 2 rows\)", text)
    with pytest.raises(ValueError, match=r"would not fit\. Use objective first_order \(it keeps 32 of the 32 tokens"):
        check_training_memory(evaluations[0], settings, rows_per_step, free_bytes=kept)
    first_order = TrainingSettings(**TRAINING, objective="first_order")
    with pytest.raises(ValueError, match=r"would not fit\. Use fewer steps \(6 now") as refused:
        check_training_memory(evaluations[0], first_order, rows_per_step, free_bytes=kept)
    assert "first_order" not in str(refused.value).split("Use", 1)[1]
    # training tells the node the estimate before its first iteration
    told = []
    train_predictor(flux, positive, negative, latent, TrainingSettings(**{**TRAINING, "iterations": 1}),
                    notify=told.append)
    assert len(told) == 1 and told[0].startswith("TokenCache training (chained): about ")


@pytest.mark.parametrize("objective", ["chained", "p_step"])
def test_a_recorded_trajectory_is_freed_as_soon_as_training_drops_it(flux, objective):
    """The recording clone's patches and the recorder refer to each other; the
    trajectory must not live on in that cycle until the garbage collector
    runs (training records one after another: on the reference model the
    p_step objective ran out of 24 GB that way)."""
    positive, negative, latent = _inputs(flux)
    settings = TrainingSettings(**{**TRAINING, "objective": objective})
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            evaluations, _ = record_trajectory(flux, positive, negative, latent, settings, seed=4)
        kept = [weakref.ref(e.deltas) for e in evaluations] + \
            [weakref.ref(t) for e in evaluations for branches in e.branches for t in branches.values()]
        assert len(kept) > len(evaluations) or objective == "chained"
        del evaluations
        assert all(ref() is None for ref in kept)
    finally:
        gc.enable()
