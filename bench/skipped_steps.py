"""ComfyUI's EasyCache and LazyCache report the steps they skipped only in
their closing log line; the benchmarks read it from there."""
import logging
import re

_SKIPPED = re.compile(r"(?:Easy|Lazy)Cache - skipped (\d+)/(\d+) steps")


class SkippedStepsLog(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.skipped = None   # (skipped, total) of the latest run

    def emit(self, record):
        found = _SKIPPED.search(record.getMessage())
        if found:
            self.skipped = (int(found.group(1)), int(found.group(2)))

    def install(self):
        logging.getLogger().addHandler(self)
        logging.getLogger().setLevel(logging.INFO)
        return self
