"""TokenCache core on its own: predictor, objective, allocation, I-step
placement, training-free score and the predictor file."""
import ast
import json
import os
import struct
from pathlib import Path

import pytest
import safetensors.torch
import torch

from dit_token_cache.accel_core.predictor_file import (FORMAT_VERSION, PredictorFileError, load_predictor,
                                                        save_predictor)
from dit_token_cache.accel_core.tokencache import (CachePredictor, FirstBlockPredictor, PlanningInput,
                                                   allocate_tokens, chained_reuse_loss, change_importance,
                                                   TokenPlanner, place_i_steps, soft_reuse_loss, take_rows)

B, L, D, N = 2, 16, 8, 3
META = {"family": "Flux", "hidden_size": D, "blocks": N, "block_counts": {"double": 1, "single": 2},
        "token_layout": {"order": "text,image", "text_tokens": 4, "image_tokens": 12},
        "training": {"steps": 30, "cost_weight": 0.1, "lr": 0.01},
        "calibration": {"sigmas": [1.0, 0.7, 0.4, 0.1], "measured": [0.9, 0.5, 0.2, 0.1]}}


def predictor(seed=0):
    torch.manual_seed(seed)
    return CachePredictor(D, N, width=16)


# -- predictor -----------------------------------------------------------------

def test_scores_shape_range_and_start_near_half():
    model = predictor()
    scores = model(torch.randn(B, L, D), torch.tensor([0.2, 0.9]))
    assert scores.shape == (B, N, L)
    assert scores.min() >= 0 and scores.max() <= 1
    assert (scores - 0.5).abs().max() < 0.1
    assert model(torch.randn(1, 5, D), torch.tensor(0.5)).shape == (1, N, 5)   # any token count, scalar t


def test_predictor_deterministic_and_config_round_trips():
    a, b = predictor(3), predictor(3)
    x, t = torch.randn(B, L, D), torch.tensor([0.1, 0.4])
    assert torch.equal(a(x, t), b(x, t))
    rebuilt = CachePredictor(**a.config())
    assert rebuilt.config() == a.config()
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in a.state_dict().items()}


def test_wrong_token_width_refused():
    with pytest.raises(ValueError, match=r"\[B, L, 8\]"):
        predictor()(torch.randn(1, 4, 5), torch.tensor([0.5]))


# -- objective -------------------------------------------------------------------

def test_soft_reuse_loss_known_values():
    fresh = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]])              # [1, 2 blocks, 1 token, 2]
    cached = fresh + torch.tensor([[[[1.0, 0.0]], [[0.0, 2.0]]]])
    scores = torch.tensor([[[0.5], [0.0]]])
    loss, parts = soft_reuse_loss(scores, fresh, cached, cost_weight=0.4)
    # difference 0.5 * [1, 0] + 1 * [0, 2] -> 4.25, over ||[1, 1]||^2 = 2
    assert parts["error"].item() == pytest.approx(2.125)
    assert parts["cost"].item() == pytest.approx(0.25)
    assert loss.item() == pytest.approx(2.225)
    _, parts = soft_reuse_loss(torch.ones_like(scores), fresh, cached, 0.4)
    assert parts["error"].item() == 0.0


def test_chained_reuse_loss_runs_errors_through_later_blocks():
    """Two blocks f(x) = 2x on one token: reusing block 0's stale output also
    changes what block 1 computes, which the first-order loss cannot see."""
    start = torch.tensor([[[1.0, 0.0]]])
    double = lambda block_id, x: 2 * x  # noqa: E731
    # the full run: x1 = 3 * x0, x2 = 9 * x0; contributions 2 * x0 and 6 * x0
    fresh = torch.stack([2 * start, 6 * start], dim=1)
    cached = torch.stack([2 * start + torch.tensor([[[0.5, 0.0]]]), 6 * start], dim=1)
    target = 9 * start
    _, parts = chained_reuse_loss(torch.ones(1, 2, 1), start, double, cached, target, 0.0)
    assert parts["error"].item() == 0.0                        # recomputing everything is the full run
    _, parts = chained_reuse_loss(torch.tensor([[[0.0], [1.0]]]), start, double, cached, target, 0.3)
    # x1 = 1 + 2.5 = 3.5, x2 = 3.5 + 7 = 10.5: error 1.5^2 over ||9 - 1||^2 = 64
    assert parts["error"].item() == pytest.approx(2.25 / 64)
    assert parts["cost"].item() == pytest.approx(0.5)
    _, first_order = soft_reuse_loss(torch.tensor([[[0.0], [1.0]]]), fresh, cached, 0.0)
    assert first_order["error"].item() == pytest.approx(0.25 / 64)   # blind to block 1 amplifying the error
    scores = torch.tensor([[[0.0], [1.0]]], requires_grad=True)
    loss, _ = chained_reuse_loss(scores, start, double, cached, target, 0.0)
    (grad,) = torch.autograd.grad(loss, scores)
    assert grad[0, 0, 0] < 0                                     # recomputing block 0 lowers the loss
    with pytest.raises(ValueError, match="chained_reuse_loss"):
        chained_reuse_loss(torch.ones(1, 3, 1), start, double, cached, target, 0.0)


def test_soft_reuse_loss_shape_mismatch():
    with pytest.raises(ValueError, match="B, n_blocks, L"):
        soft_reuse_loss(torch.rand(1, 2, 3), torch.zeros(1, 2, 4, 5), torch.zeros(1, 2, 4, 5), 0.1)


def test_training_lowers_loss_and_scores_changing_tokens_higher():
    torch.manual_seed(0)
    changing = torch.arange(L) % 4 == 0
    x = torch.randn(B, L, D)
    x[..., 0] = torch.where(changing, 2.0, -2.0)        # the predictor can tell the tokens apart
    fresh = 0.5 * torch.randn(B, N, L, D)
    cached = fresh + torch.where(changing, 1.0, 0.02)[None, None, :, None] * torch.randn(B, N, L, D)
    t = torch.tensor([0.3, 0.7])
    model = predictor()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss, _ = soft_reuse_loss(model(x, t), fresh, cached, cost_weight=0.1)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    with torch.no_grad():
        per_token = model(x, t).mean(dim=(0, 1))
    assert per_token[changing].min() > per_token[~changing].max()


# -- first-block predictor ---------------------------------------------------------

class LinearRunner:
    """A stand-in family runner: the 'block' is one linear layer on the tokens."""

    def __call__(self, block, inputs):
        return block(inputs.tokens + inputs.block_args["shift"][:, None, :])

    def flops(self, block, tokens):
        return 2.0 * block.weight.numel() * tokens


def first_block_predictor(seed=0):
    torch.manual_seed(seed)
    return FirstBlockPredictor(torch.nn.Linear(D, D), LinearRunner(), D, N, "double")


def test_first_block_predictor_scores_and_round_trips(tmp_path):
    model = first_block_predictor(4)
    inputs = PlanningInput(torch.randn(B, L, D), {"shift": torch.randn(B, D)})
    scores = model.score(inputs, torch.tensor([0.5]))
    assert scores.shape == (B, N, L) and 0 <= scores.min() and scores.max() <= 1
    assert model.flops(L) == 2.0 * D * D * L + 2.0 * N * D * L
    path = saved(tmp_path, model)
    with pytest.raises(PredictorFileError, match="first-block predictor; it runs only with its model"):
        load_predictor(path)
    with pytest.raises(PredictorFileError, match="'double' block, this model's is 'single'"):
        load_predictor(path, first_block=lambda: (torch.nn.Linear(D, D), LinearRunner(), "single"))
    loaded, metadata = load_predictor(path, first_block=lambda: (torch.nn.Linear(D, D), LinearRunner(), "double"))
    assert metadata["predictor"] == {**model.config(), "architecture": "first_block"}
    assert torch.equal(loaded.score(inputs, None), scores)


def test_planning_input_rows_cut_every_batched_tensor():
    inputs = PlanningInput(torch.randn(4, L, D), {"vec": torch.randn(4, D), "pe": torch.randn(1, L),
                                                  "mods": (torch.randn(4, 1, D),), "transformer_options": {"x": 1}})
    first = inputs.rows(2)
    assert first.tokens.shape[0] == 2 and first.block_args["vec"].shape[0] == 2
    assert first.block_args["pe"].shape[0] == 1 and first.block_args["mods"][0].shape[0] == 2
    assert first.block_args["transformer_options"] is inputs.block_args["transformer_options"]
    assert take_rows([torch.zeros(4, 3), "text"], 1, 4)[0].shape == (1, 3)


# -- block-level allocation -------------------------------------------------------

def test_allocate_tokens_counts_ratios_and_protection():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.1],
                           [0.5, 0.0, 0.45, 0.0, 0.0],
                           [0.2, 0.3, 0.1, 0.0, 0.0],
                           [0.0, 0.0, 0.0, 0.0, 0.0]])
    indices, ratios = allocate_tokens(scores, cache_ratio=0.6, protected_last_blocks=1)
    # 3 cacheable blocks x 5 tokens, 40 % recomputed: the 6 best scores
    assert [i.tolist() for i in indices] == [[0, 1, 2, 3], [0, 2], [], [0, 1, 2, 3, 4]]
    assert ratios == [0.8, 0.4, 0.0, 1.0]


def test_allocate_tokens_exact_budget_and_edges():
    torch.manual_seed(1)
    scores = torch.rand(6, 50)
    indices, ratios = allocate_tokens(scores, 0.9, 2)
    assert sum(len(i) for i in indices[:4]) == 20                # round(0.1 * 50 * 4)
    assert all(torch.equal(i, torch.arange(50)) for i in indices[4:])
    assert all(torch.equal(i, i.sort().values) for i in indices)
    assert ratios[4:] == [1.0, 1.0]
    assert [len(i) for i in allocate_tokens(scores, 1.0, 2)[0]] == [0, 0, 0, 0, 50, 50]
    assert [len(i) for i in allocate_tokens(scores, 0.0, 0)[0]] == [50] * 6
    assert allocate_tokens(scores, 0.5, 9)[1] == [1.0] * 6       # every block protected
    with pytest.raises(ValueError, match="cache_ratio"):
        allocate_tokens(scores, 1.5, 0)
    with pytest.raises(ValueError, match="protected_last_blocks"):
        allocate_tokens(scores, 0.5, -1)


def test_allocate_tokens_ties_are_deterministic():
    indices, _ = allocate_tokens(torch.zeros(2, 4), 0.5, 0)
    assert [i.tolist() for i in indices] == [[0, 1, 2, 3], []]   # earlier block, then earlier token


# -- I-step placement ----------------------------------------------------------------

def test_place_i_steps_uniform_is_evenly_spaced():
    assert place_i_steps([1.0] * 10, 5) == [0, 2, 4, 6, 8]
    assert place_i_steps([1.0] * 10, 2) == [0, 5]
    assert place_i_steps([0.0] * 10, 2) == [0, 5]                # no signal counts as uniform


def test_place_i_steps_follows_importance():
    assert place_i_steps([10.0] * 3 + [1.0] * 17, 4) == [0, 2, 3, 9]
    assert place_i_steps([100.0] + [0.0] * 9, 3) == [0, 1, 2]     # collisions pushed to distinct steps
    assert place_i_steps([0.0] * 9 + [1.0], 3) == [0, 8, 9]       # late importance, still room for all


def test_place_i_steps_count_edges():
    assert place_i_steps([1.0] * 4, 0) == [0]
    assert place_i_steps([1.0] * 4, 1) == [0]
    assert place_i_steps([1.0] * 4, 9) == [0, 1, 2, 3]
    assert place_i_steps([3.0], 2) == [0]
    with pytest.raises(ValueError, match="empty"):
        place_i_steps([], 2)
    with pytest.raises(ValueError, match=">= 0"):
        place_i_steps([1.0, -1.0], 2)


# -- training-free score ---------------------------------------------------------------

def test_change_importance_known_tensors():
    previous = torch.tensor([[[3.0, 4.0], [1.0, 0.0], [0.0, 0.0]]])
    current = torch.tensor([[[3.0, 4.0], [2.0, 0.0], [0.0, 0.0]]])
    assert change_importance(current, previous).tolist() == [[0.0, 1.0, 0.0]]
    assert change_importance(previous * 1.5, previous)[0, :2].tolist() == pytest.approx([0.5, 0.5])
    with pytest.raises(ValueError):
        change_importance(current, previous[:, :2])


# -- predictor file ------------------------------------------------------------------------

def saved(tmp_path, model=None, **changes):
    path = str(tmp_path / "predictor.safetensors")
    save_predictor(path, model or predictor(), {**META, **changes})
    return path


def write_raw(path, metadata, tensors=None):
    safetensors.torch.save_file(tensors or {"w": torch.zeros(2)}, str(path),
                                metadata={k: json.dumps(v) for k, v in metadata.items()})
    return str(path)


def test_round_trip_is_bit_identical(tmp_path):
    model = predictor(5)
    path = saved(tmp_path, model)
    assert Path(path).read_bytes()[:8] != b"PK\x03\x04"                      # not a torch zip/pickle
    torch.manual_seed(11)
    expected_draw = torch.rand(3)
    torch.manual_seed(11)
    loaded, metadata = load_predictor(path, {"family": "Flux", "hidden_size": D, "blocks": N})
    assert torch.equal(torch.rand(3), expected_draw)                         # loading leaves the RNG alone
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor) and loaded.state_dict()[name].device.type == "cpu"
    assert {k: metadata[k] for k in META} == META
    assert metadata["format_version"] == FORMAT_VERSION
    assert metadata["predictor"] == {**model.config(), "architecture": "mlp_mixer"}
    x, t = torch.randn(1, 6, D), torch.tensor([0.5])
    assert torch.equal(loaded(x, t), model(x, t))
    assert os.listdir(tmp_path) == ["predictor.safetensors"]


def test_interrupted_save_leaves_old_file(tmp_path, monkeypatch):
    path = saved(tmp_path, predictor(1))
    before = Path(path).read_bytes()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        saved(tmp_path, predictor(2))
    assert Path(path).read_bytes() == before
    assert os.listdir(tmp_path) == ["predictor.safetensors"]                 # no temp left behind


def test_save_refuses_incomplete_or_inconsistent_metadata(tmp_path):
    with pytest.raises(ValueError, match="lacks calibration"):
        save_predictor(str(tmp_path / "p.safetensors"), predictor(),
                       {k: v for k, v in META.items() if k != "calibration"})
    with pytest.raises(ValueError, match="blocks=4"):
        saved(tmp_path, blocks=4)
    assert os.listdir(tmp_path) == []


def test_refuses_other_model(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(PredictorFileError) as error:
        load_predictor(path, {"family": "SD3", "hidden_size": 1536, "blocks": 24})
    message = str(error.value)
    assert "trained for family='Flux', hidden_size=8, blocks=3" in message
    assert "this model is family='SD3', hidden_size=1536, blocks=24" in message


def test_refuses_not_safetensors(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("just some text, long enough to have eight bytes")
    with pytest.raises(PredictorFileError, match="not a safetensors file.*expected a TokenCache predictor"):
        load_predictor(str(text))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"abc")
    with pytest.raises(PredictorFileError, match="too short"):
        load_predictor(str(tiny))
    bad_json = tmp_path / "bad.safetensors"
    bad_json.write_bytes(struct.pack("<Q", 4) + b"\xff{{{")
    with pytest.raises(PredictorFileError, match="header is not JSON"):
        load_predictor(str(bad_json))
    with pytest.raises(PredictorFileError, match="no such file"):
        load_predictor(str(tmp_path / "missing.safetensors"))


def test_refuses_truncated(tmp_path):
    path = saved(tmp_path)
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:-10])
    with pytest.raises(PredictorFileError, match="truncated or damaged.*header describes"):
        load_predictor(path)
    Path(path).write_bytes(data[:40])
    with pytest.raises(PredictorFileError, match="truncated"):
        load_predictor(path)


def test_refuses_wrong_or_missing_version(tmp_path):
    base = {**META, "format": "tokencache-predictor", "predictor": predictor().config()}
    path = write_raw(tmp_path / "v2.safetensors", {**base, "format_version": 2})
    with pytest.raises(PredictorFileError, match="format_version 2, .* reads format_version 1"):
        load_predictor(path)
    path = write_raw(tmp_path / "v0.safetensors", base)
    with pytest.raises(PredictorFileError, match="no format_version.*expected format_version 1"):
        load_predictor(path)


def test_refuses_wrong_metadata(tmp_path):
    lora = write_raw(tmp_path / "lora.safetensors", {"ss_network_dim": 16})
    with pytest.raises(PredictorFileError, match="not a TokenCache predictor.*expected format"):
        load_predictor(lora)
    partial = {"format": "tokencache-predictor", "format_version": 1, "family": "Flux"}
    path = write_raw(tmp_path / "partial.safetensors", partial)
    with pytest.raises(PredictorFileError, match="lacks hidden_size, blocks, .*predictor file holds"):
        load_predictor(path)
    not_json = tmp_path / "raw.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(1)}, str(not_json),
                                metadata={"format": "tokencache-predictor", "family": "Flux"})
    with pytest.raises(PredictorFileError, match="is not JSON.*expected a file written by save_predictor"):
        load_predictor(str(not_json))
    full = {**META, "format": "tokencache-predictor", "format_version": 1, "predictor": predictor().config()}
    path = write_raw(tmp_path / "weights.safetensors", full, {"head.weight": torch.zeros(3, 3)})
    with pytest.raises(PredictorFileError, match="weights do not fit"):
        load_predictor(path)


def test_never_pickles():
    root = Path(__file__).resolve().parents[1] / "accel_core"
    for name in ("tokencache.py", "predictor_file.py"):
        tree = ast.parse((root / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), name
            if isinstance(node, ast.Attribute) and node.attr == "load":
                assert not (isinstance(node.value, ast.Name) and node.value.id == "torch"), name


# -- work accounting ---------------------------------------------------------------------

def test_predictor_work_counts_as_computed_and_shows_in_the_summary():
    from dit_token_cache.accel_core.stats import WorkStats
    stats = WorkStats()
    stats.record_block(100.0, 40.0, 10, 4)
    stats.record_predictor(10.0)
    assert stats.flops_computed == 50.0 and stats.flops_uncached == 100.0 and stats.predictor_flops == 10.0
    assert stats.theoretical_speedup == 2.0 and stats.token_fraction == 0.4
    assert "computed 50.0% of block work, predictor 10.0% (theoretical 2.00x)" in stats.summary("TokenCache")
    assert "predictor" not in WorkStats().summary("DuCa")


def test_headline_puts_the_speedup_first_and_fits_the_node():
    from dit_token_cache.accel_core.schedule import StepKind
    from dit_token_cache.accel_core.stats import WorkStats
    stats = WorkStats()
    for step, kind in enumerate([StepKind.FULL, StepKind.AGGRESSIVE, StepKind.CONSERVATIVE] * 8):
        stats.record_step(step, kind)
    stats.record_block(427.0, 100.0, 10, 3)
    stats.peak_cache_bytes = 34 * 2**20
    assert stats.headline("DuCa") == "DuCa 4.27x work (24 steps: 8 full, 8 aggressive, 8 conservative), cache 34 MiB"
    toca = WorkStats()
    toca.record_step(0, StepKind.FULL)
    toca.record_step(1, StepKind.CONSERVATIVE)
    toca.peak_cache_bytes = 2**19
    toca.warn_once("caching is off: reason")
    toca.note_once("a note for the log only")
    assert toca.headline("ToCa") == "ToCa 1.00x work (2 steps: 1 full, 1 conservative), cache 0.5 MiB\ncaching is off: reason"


def test_planner_rotates_tokens_over_consecutive_p_steps_and_forgets_after_an_i_step():
    """Constant scores: without staleness every P-step picks the same tokens;
    with it a token recomputed at one P-step waits while others are picked,
    and after an I-step (a step without a plan) the scores alone decide again."""
    blocks, tokens = 3, 20
    scores = torch.linspace(0, 1, tokens).repeat(blocks, 1)
    inputs = PlanningInput(torch.zeros(1, tokens, D))

    def planner(weight):
        p = TokenPlanner(blocks, 0.75, 1, seed=0, fallback="random", staleness_weight=weight)
        p.scores = lambda *args: scores
        return p
    fixed, rotating = planner(0.0), planner(2.0)
    first = fixed.plan(inputs, 0.5, [None] * blocks, 1)
    assert all(torch.equal(a, b) for a, b in zip(first, fixed.plan(inputs, 0.5, [None] * blocks, 2)))
    picked = rotating.plan(inputs, 0.5, [None] * blocks, 1)
    assert all(torch.equal(a, b) for a, b in zip(picked, first))          # nothing stale yet: the top scores
    following = rotating.plan(inputs, 0.5, [None] * blocks, 2)
    for block in range(blocks - 1):
        assert len(following[block]) == len(picked[block]) == 5
        assert not set(following[block].tolist()) & set(picked[block].tolist())
    assert torch.equal(following[-1], torch.arange(tokens))                  # protected: every token
    after_i_step = rotating.plan(inputs, 0.5, [None] * blocks, 4)             # step 3 was an I-step
    assert all(torch.equal(a, b) for a, b in zip(after_i_step, first))
