"""Estimating cached features instead of reusing them.

Reuse is a zero-order estimate: the value computed at the last computed step
stands for the value now. A forecast extrapolates instead (TaylorSeer arXiv
2503.06923, FoCa arXiv 2508.16211): order 1 along the line through the values
of the last two full steps, order 2 along the parabola through the last three,
in the model's time coordinate, so uneven schedules (karras, beta) and the
second evaluation of heun are handled.

The trend comes from full steps only, where every token of every block is
computed exactly. A conservative step computes some tokens again, on inputs
that are partly estimated: each of them restarts from its fresh value and the
trend carries it on from there. (Lines drawn through conservative-step values
instead were measured worse than plain reuse on the reference model: their
errors are amplified by extrapolation.) Restarting shifts the polynomial's
constant term, so it costs no copy beyond the trend's: order k keeps k + 1.
"""
import math
from typing import List, Optional

import torch

from .precision import Packed, pack, unpack, write

FORECASTS = ("reuse", "linear", "quadratic")
ORDERS = {name: order for order, name in enumerate(FORECASTS)}


class FeatureHistory:
    """One cache entry as Newton's polynomial through its last `depth`
    full-step values: terms[0] its constant term (the newest values,
    shifted where conservative steps refreshed tokens), terms[k] the
    k-th divided difference, times the full steps' times, newest first.
    depth = forecast order + 1; anchors further apart in time than `max_span`
    lower the order used. Terms are stored at `precision` (precision.py) on
    `device` (None: where they were computed).

    Values are [rows, L, ...] with the token dimension `dim`.
    """

    def __init__(self, depth: int, max_span: float = math.inf, dim: int = 1, precision: str = "model",
                 device: Optional[torch.device] = None):
        if depth < 1:
            raise ValueError(f"FeatureHistory depth={depth!r}: accepted a whole number >= 1")
        self.depth = depth
        self.max_span = max_span
        self.dim = dim
        self.precision = precision
        self.device = device
        self.terms: List[Packed] = []
        self.times: List[float] = []

    @property
    def newest(self) -> torch.Tensor:
        """The constant term: with reuse (order 0), every token's latest value."""
        return unpack(self.terms[0])

    @property
    def shape(self) -> torch.Size:
        return self.terms[0].shape

    @property
    def nbytes(self) -> int:
        return sum(term.nbytes for term in self.terms)

    def _pack(self, value: torch.Tensor) -> Packed:
        return pack(value, self.precision, self.device, self.dim)

    def put(self, value: torch.Tensor, time: float) -> None:
        """Every token computed exactly at `time` (a full step): a new anchor."""
        time = float(time)
        if self.times and time == self.times[0]:
            self.terms, self.times = [], []   # the same step again: no trend from it
        fresh = [value]
        for k in range(1, min(self.depth, len(self.terms) + 1)):
            step = (fresh[k - 1].float() - unpack(self.terms[k - 1]).float()) / (time - self.times[k - 1])
            fresh.append(step.to(value.dtype))
        self.terms = [self._pack(term) for term in fresh]
        self.times = [time] + self.times[:self.depth - 1]

    def refresh(self, index: Optional[torch.Tensor], value: torch.Tensor, time: float) -> None:
        """Tokens `index` (None: all) computed again at `time` on partly
        estimated inputs: the trend goes on from their fresh values."""
        order = self.order()
        shifted = value.float() - self._increment(float(time), index, order, value.device) if order else value
        shifted = shifted.to(self.terms[0].dtype)
        if index is None:
            self.terms[0] = self._pack(shifted)
        else:
            write(self.terms[0], index, shifted, self.dim)

    def order(self, max_span: Optional[float] = None) -> int:
        """The order the anchors allow: k + 1 of them within `max_span` (by
        default the history's) in time; further apart, a line or parabola
        overshoots."""
        max_span = self.max_span if max_span is None else max_span
        allowed = 0
        for k in range(1, len(self.times)):
            if abs(self.times[0] - self.times[k]) > max_span:
                break
            allowed = k
        return allowed

    def _rows(self, term: Packed, index: Optional[torch.Tensor], device: Optional[torch.device]) -> torch.Tensor:
        return unpack(term, index, self.dim, device)

    def _increment(self, time: float, index: Optional[torch.Tensor], order: int,
                   device: Optional[torch.device] = None) -> torch.Tensor:
        """p(time) - p(times[0]) for the polynomial p of up to `order`, float32.
        The trend is followed no further past the newest full step than the
        last two full steps are apart, then held: a line learnt over a short
        stretch overshoots when carried much further (TokenCache's I-steps can
        be many steps apart)."""
        reach = abs(self.times[0] - self.times[1])
        time = self.times[0] + max(-reach, min(reach, time - self.times[0]))
        increment, factor = None, 1.0
        for k in range(1, order + 1):
            factor *= time - self.times[k - 1]
            term = factor * self._rows(self.terms[k], index, device).float()
            increment = term if increment is None else increment + term
        return increment

    def estimate(self, time: float, index: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None) -> torch.Tensor:
        """The entry at `time` (only the tokens `index`, if given), on `device`
        (default: where it is stored); at order 0 the newest values themselves.
        Tokens computed at `time` come back as computed, to the rounding of
        their dtype and the cache's precision."""
        constant = self._rows(self.terms[0], index, device)
        order = self.order()
        if order == 0:
            return constant
        return (constant.float() + self._increment(float(time), index, order, device)).to(constant.dtype)
