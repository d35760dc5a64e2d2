"""One adapter per model family: how to run that family's blocks on a token
subset. The run (accel_core.run.CacheRun) decides what each step computes;
an adapter computes what it is told, through the family's own submodules."""
from typing import Protocol, Sequence


class Adapter(Protocol):
    """What a family adapter provides (FluxFamilyAdapter, ModulewiseAdapter)."""
    family: str                  # the name users know, for messages
    family_key: str              # stable key (nodes/families.py), written into predictor files
    selectors: Sequence[str]     # token selectors it can score
    tokencache: bool             # whether TokenCache can drive it (TokenCacheAdapter)

    def install(self, model_patcher, hooks) -> None:
        """Patch the cloned ModelPatcher so its blocks hand their work to the run
        under way (hooks: nodes.patcher.PatchHooks)."""


class TokenCacheAdapter(Adapter, Protocol):
    """An adapter TokenCache can drive: it plans at the first block and trains predictors."""
    hidden: int                  # hidden size of the tokens entering the first block
    block_count: int

    def planning_input(self, args):
        """What the first block got, as accel_core.tokencache.PlanningInput."""

    def predictor_parts(self):
        """(a copy of the first block, its runner, its kind) for a first-block predictor."""

    def block_contribution(self, block_id, x, args, txt_len, dtype):
        """f_l(x) = block(x) - x through the model's own block, for chained training."""
