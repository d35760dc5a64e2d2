"""accel_core on its own: schedule, selectors, cache store, settings."""
import pytest
import torch

from dit_token_cache.accel_core.cache_store import CacheStore
from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.run import CacheRun
from dit_token_cache.accel_core.schedule import CacheSchedule, StepKind, step_index
from dit_token_cache.accel_core.selectors import pick_tokens, random_scores

F, A, C = StepKind.FULL, StepKind.AGGRESSIVE, StepKind.CONSERVATIVE
SIGMAS = [1.0 - i / 10 for i in range(11)]   # 10 steps, last entry is the end


def kinds(**kw):
    config = CacheConfig(**{k: v for k, v in kw.items() if k not in ("start", "end")})
    return CacheSchedule(config, SIGMAS, kw.get("start", 1.0), kw.get("end", 0.0)).kinds


def test_duca_cycle_alternates_aggressive_then_conservative():
    assert kinds(cycle_length=4) == [F, A, C, A, F, A, C, A, F, A]


def test_duca_conservative_first_order():
    assert kinds(cycle_length=3, aggressive_first=False) == [F, C, A, F, C, A, F, C, A, F]


def test_toca_and_fora_modes():
    assert kinds(cycle_length=3, mode="toca") == [F, C, C, F, C, C, F, C, C, F]
    assert kinds(cycle_length=3, mode="fora") == [F, A, A, F, A, A, F, A, A, F]


def test_cycle_length_one_is_all_full():
    assert kinds(cycle_length=1) == [F] * 10


def test_steps_outside_window_are_full_and_window_starts_with_full():
    # window holds sigmas 0.75..0.25 -> steps 3..7
    assert kinds(cycle_length=3, start=0.75, end=0.25) == [F, F, F, F, A, C, F, A, F, F]


def test_cache_needed_only_before_a_cached_step():
    schedule = CacheSchedule(CacheConfig(cycle_length=4), SIGMAS, 1.0, 0.0)
    assert [schedule.cache_needed_after(i) for i in range(10)] == [True, True, True, False, True, True, True, False, True, False]


def test_step_index_by_nearest_sigma_ignores_the_end_entry():
    assert step_index(0.52, SIGMAS) == 5
    assert step_index(0.0, SIGMAS) == 9           # heun's last correction lands on the last step
    assert step_index(1.0, [1.0, 0.0]) == 0


def test_recompute_count():
    assert CacheConfig(cache_ratio=0.9).recompute_count(100) == 10
    assert CacheConfig(cache_ratio=1.0).recompute_count(100) == 0
    assert CacheConfig(cache_ratio=0.0).recompute_count(7) == 7


@pytest.mark.parametrize("field,value,accepted", [
    ("cache_ratio", 1.5, "0.0 to 1.0"),
    ("cache_ratio", -0.1, "0.0 to 1.0"),
    ("cycle_length", 0, ">= 1"),
    ("selector", "magic", "random, v_norm, k_norm, similarity, attention"),
    ("mode", "fast", "duca, toca, fora"),
    ("cache_device", "gpu9", "model_device, cpu"),
    ("end_percent", 1.2, "0.0 to 1.0"),
    ("staleness_weight", -1.0, "0.0 to 10.0"),
])
def test_bad_settings_name_the_value_and_what_is_accepted(field, value, accepted):
    with pytest.raises(ValueError) as error:
        CacheConfig(**{field: value})
    assert f"{field}={value!r}" in str(error.value) and accepted in str(error.value)


def test_start_after_end_rejected():
    with pytest.raises(ValueError, match="start must be <= end"):
        CacheConfig(start_percent=0.8, end_percent=0.2)


def test_random_scores_depend_on_seed_step_and_block_only():
    assert torch.equal(random_scores(50, 7, 3, 2), random_scores(50, 7, 3, 2))
    assert not torch.equal(random_scores(50, 7, 3, 2), random_scores(50, 8, 3, 2))
    assert not torch.equal(random_scores(50, 7, 3, 2), random_scores(50, 7, 4, 2))
    assert not torch.equal(random_scores(50, 7, 3, 2), random_scores(50, 7, 3, 1))


def test_pick_tokens_takes_top_scores_and_staleness_promotes_old_tokens():
    scores = torch.tensor([0.0, 0.9, 0.1, 1.0, 0.5])
    fresh = torch.zeros(5)
    assert pick_tokens(scores, fresh, 0.25, 4, 2).tolist() == [1, 3]
    stale = torch.tensor([20.0, 0, 0, 0, 0])
    assert pick_tokens(scores, stale, 0.25, 4, 2).tolist() == [0, 3]
    batch_scores = torch.stack([scores, scores.flip(0)])   # averaged over the batch
    assert pick_tokens(batch_scores, fresh, 0.0, 4, 5).tolist() == [0, 1, 2, 3, 4]


def test_cache_store_keeps_per_cond_chunks_and_copies():
    store = CacheStore()
    batch = torch.arange(12.0).reshape(2, 3, 2)
    store.put(["cond", "uncond"], "k", batch)
    batch += 100   # blocks update in place: the cache must not follow
    assert torch.equal(store.get(["uncond"], "k", torch.device("cpu")), torch.arange(6.0, 12.0).reshape(1, 3, 2))
    assert torch.equal(store.get(["cond", "uncond"], "k", torch.device("cpu")), torch.arange(12.0).reshape(2, 3, 2))
    store.scatter(["cond", "uncond"], "k", torch.tensor([1]), torch.full((2, 1, 2), -1.0))
    assert store.get(["cond"], "k", torch.device("cpu"))[0, :, 0].tolist() == [0.0, -1.0, 4.0]
    assert store.nbytes == 12 * 4 and store.peak_bytes == 12 * 4
    assert not store.has(["cond", "other"], "k")
    store.put(["cond", "uncond"], "age", torch.zeros(2, 3, dtype=torch.int32))
    store.increment(["uncond"], "age")
    assert store.get(["cond", "uncond"], "age", torch.device("cpu")).tolist() == [[0, 0, 0], [1, 1, 1]]
    store.put(["cond", "uncond"], "k", torch.zeros(2, 1, 2))     # replacing an entry updates the count
    assert store.nbytes == 4 * 4 + 6 * 4 and store.peak_bytes == 12 * 4 + 6 * 4
    store.clear()
    assert store.nbytes == 0


def test_run_falls_back_to_full_without_cache_and_resets_on_shape_change():
    run = CacheRun(CacheConfig(cycle_length=4), SIGMAS, 1.0, 0.0)
    plan = run.begin_forward(0.9, ["c"], ("shape", 1))        # step 1 is aggressive, but nothing is cached
    assert plan.kind is F and plan.fill
    run.put_final(torch.ones(1, 4, 2))
    run.end_forward()
    assert run.begin_forward(0.9, ["c"], ("shape", 1)).kind is A
    run.end_forward()
    assert run.begin_forward(0.8, ["c"], ("other shape", 1)).kind is F   # cache dropped
    assert any("cache reset" in note for note in run.stats.notes)


def test_accel_core_never_imports_comfy():
    import ast
    from pathlib import Path

    for source in (Path(__file__).resolve().parents[1] / "accel_core").glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.split(".")[0] in ("comfy", "comfy_api", "nodes", "folder_paths") for n in names), source
