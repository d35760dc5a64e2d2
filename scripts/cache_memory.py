"""How much memory a token cache takes, from the model and latent sizes alone.

What the engines store per cond (cond and uncond are separate entries) once a
full step has filled the cache:
- Flux family (Flux, Chroma, HunyuanVideo): per double block the attention
  and MLP outputs of the image and text streams; per single block the
  attention output and the block's output over all tokens; an int32
  staleness counter per token and block;
- modulewise engine (Wan): per block the outputs of self_attn, cross_attn
  and ffn, and a staleness counter per token (with the similarity selector
  also the inputs of cross_attn and ffn);
- the last block's output, which aggressive steps estimate (mode fora keeps
  only this);
- each forecast order keeps one more copy of every output (the divided
  differences of the last full steps);
- cache_precision: model dtype, bf16 (2 bytes a value), or fp8 (1 byte a
  value and a float32 scale per token; the last block's output stays bf16);
- cache_budget_gb: blocks are kept in order while their cache fits, exactly
  as CacheRun decides (accel_core/run.py), the others compute in full.

tests/test_cache_memory_formula.py checks the formula byte for byte against
the measured peak_cache_bytes of tiny Flux and Wan runs.

    python scripts/cache_memory.py   # the README's table: image and video models
"""
FP8_SCALE_BYTES = 4


def video_tokens(frames: int, width: int, height: int, spatial_down: int = 8, temporal_down: int = 4, patch: int = 2) -> int:
    """Transformer tokens of one cond: latent frames x latent height / patch x latent width / patch."""
    return ((frames - 1) // temporal_down + 1) * (height // spatial_down // patch) * (width // spatial_down // patch)


def feature_bytes(tokens: int, dim: int, dtype_bytes: int, precision: str = "model") -> int:
    """One stored output of `tokens` x `dim` values (accel_core/precision.py)."""
    if precision == "fp8":
        return tokens * dim + tokens * FP8_SCALE_BYTES
    if precision == "bf16":
        return tokens * dim * min(2, dtype_bytes)
    return tokens * dim * dtype_bytes


def final_precision(precision: str) -> str:
    """The last hidden state is kept at bf16 at least (accel_core/precision.py)."""
    return "bf16" if precision == "fp8" else precision


def _budgeted(blocks, final, first_block_largest, conds, budget_bytes):
    """Total bytes of the blocks kept (list of per-cond bytes, in order) and
    the final state, as CacheRun._fit_budget and _make_room_for_final decide."""
    if budget_bytes is None:
        return conds * (sum(blocks) + final), len(blocks)
    used = first_block_largest * conds      # reserved for the final state until it is stored
    reserved, kept = used, []
    for size in blocks:
        if used + size * conds <= budget_bytes:
            used += size * conds
            kept.append(size * conds)
    used += final * conds - reserved
    while used > budget_bytes and kept:
        used -= kept.pop()
    return used, len(kept)


def flux_cache_bytes(img_tokens: int, txt_tokens: int, hidden: int, double: int, single: int, dtype_bytes: int,
                     conds: int = 1, forecast_order: int = 0, precision: str = "model", budget_bytes=None,
                     mode: str = "duca"):
    """(peak cache bytes, blocks cached) of a Flux-family run, random selector."""
    copies = 1 + forecast_order
    joint = img_tokens + txt_tokens
    feature = lambda tokens: feature_bytes(tokens, hidden, dtype_bytes, precision)  # noqa: E731
    final = copies * feature_bytes(joint, hidden, dtype_bytes, final_precision(precision))
    if mode == "fora":
        return conds * final, 0
    double_block = copies * 2 * (feature(img_tokens) + feature(txt_tokens)) + 4 * joint
    single_block = copies * 2 * feature(joint) + 4 * joint
    blocks = [double_block] * double + [single_block] * single
    largest = copies * feature(max(img_tokens, txt_tokens) if double else joint)
    return _budgeted(blocks, final, largest, conds, budget_bytes)


def wan_cache_bytes(tokens: int, dim: int, blocks: int, dtype_bytes: int, conds: int = 2, selector: str = "random",
                    forecast_order: int = 0, precision: str = "model", budget_bytes=None, mode: str = "duca"):
    """(peak cache bytes, blocks cached) of a Wan run (modulewise engine:
    self_attn, cross_attn, ffn per block), once a conservative step has run."""
    copies = 1 + forecast_order
    row = feature_bytes(tokens, dim, dtype_bytes, precision)
    final = copies * feature_bytes(tokens, dim, dtype_bytes, final_precision(precision))
    if mode == "fora":
        return conds * final, 0
    # similarity keeps the inputs of cross_attn and ffn as they are (model dtype)
    inputs = 2 * tokens * dim * dtype_bytes if selector == "similarity" else 0
    per_block = 3 * copies * row + inputs + tokens * 4            # + int32 staleness
    return _budgeted([per_block] * blocks, final, copies * row, conds, budget_bytes)


RUNS = {   # name: (formula, sizes, conds)
    "Flux.1-dev, 1024x1024": ("flux", dict(img_tokens=4096, txt_tokens=512, hidden=3072, double=19, single=38), 1),
    "Wan 2.1 14B, 81 frames 832x480, CFG": ("wan", dict(tokens=video_tokens(81, 832, 480), dim=5120, blocks=40), 2),
    "Wan 2.1 1.3B, 81 frames 832x480, CFG": ("wan", dict(tokens=video_tokens(81, 832, 480), dim=1536, blocks=30), 2),
    "Wan 2.2 TI2V 5B, 121 frames 1280x704, CFG": (
        "wan", dict(tokens=video_tokens(121, 1280, 704, spatial_down=16), dim=3072, blocks=30), 2),
    "HunyuanVideo, 129 frames 1280x720": (
        "flux", dict(img_tokens=video_tokens(129, 1280, 720), txt_tokens=256, hidden=3072, double=20, single=40), 1),
}
SETTINGS = [   # column: (forecast order, precision, budget GiB, mode)
    ("`linear`, model precision", 1, "model", None, "duca"),
    ("`reuse`, bf16", 0, "bf16", None, "duca"),
    ("`linear`, fp8", 1, "fp8", None, "duca"),
    ("`reuse`, fp8", 0, "fp8", None, "duca"),
    ("`linear`, fp8, budget 16 GiB", 1, "fp8", 16, "duca"),
    ("fora `linear`, bf16", 1, "bf16", None, "fora"),
]


def table() -> str:
    header = "| run, bf16 model | " + " | ".join(name for name, *_ in SETTINGS) + " |"
    lines = [header, "|" + "---|" * (len(SETTINGS) + 1)]
    for run, (formula, sizes, conds) in RUNS.items():
        cells = []
        for _, order, precision, budget, mode in SETTINGS:
            budget_bytes = budget * 2**30 if budget else None
            if formula == "flux":
                total, kept = flux_cache_bytes(**sizes, dtype_bytes=2, conds=conds, forecast_order=order,
                                               precision=precision, budget_bytes=budget_bytes, mode=mode)
                blocks = sizes["double"] + sizes["single"]
            else:
                total, kept = wan_cache_bytes(**sizes, dtype_bytes=2, conds=conds, forecast_order=order,
                                              precision=precision, budget_bytes=budget_bytes, mode=mode)
                blocks = sizes["blocks"]
            cell = f"{total / 2**30:.1f} GiB"
            if budget:
                cell += f" ({kept}/{blocks} blocks)"
            cells.append(cell)
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
    print("\n(scripts/cache_memory.py: the cache alone, not the model's weights or activations; 1 GiB = 2**30 bytes)")
