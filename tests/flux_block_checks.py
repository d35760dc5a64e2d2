"""Helpers shared by the Flux-family tests: patched runs, their statistics,
and the pieces of the conservative-step reference checks."""

from dit_token_cache.accel_core.config import CacheConfig
from dit_token_cache.accel_core.run import CacheRun
from dit_token_cache.nodes.patcher import SETTINGS_KEY, apply_token_cache


def duca(model, **settings):
    return apply_token_cache(model, CacheConfig(**settings))


def stats_of(patched):
    return patched.model_options["transformer_options"][SETTINGS_KEY].last_run.stats


def rel_l2(a, b):
    return float((a - b).norm() / b.norm())


class Capture:
    """Forward hooks on a block's own submodules, during the ORIGINAL block's call."""

    def __init__(self, modules):
        self.out, self.inp = {}, {}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name):
        def hook(module, inputs, output):
            self.inp[name], self.out[name] = inputs[0].detach().clone(), output.detach().clone()
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def fail_on_fallback(_args):
    raise AssertionError("the adapter fell back to the original block")


def two_step_run(cache_ratio):
    # steps: full (sigma 1.0), aggressive (0.6), conservative (0.3)
    return CacheRun(CacheConfig(cycle_length=3, cache_ratio=cache_ratio, seed=5), [1.0, 0.6, 0.3, 0.0], 1.0, 0.0)
