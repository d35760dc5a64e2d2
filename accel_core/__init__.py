"""Framework-free token caching: schedules, selectors, cache store, statistics.
Never imports comfy."""
from .config import CacheConfig
from .run import CacheRun
from .schedule import CacheSchedule, StepKind

__all__ = ["CacheConfig", "CacheRun", "CacheSchedule", "StepKind"]
