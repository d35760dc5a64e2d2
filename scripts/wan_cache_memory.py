"""How much memory the modulewise engine's cache takes for a Wan run, from the sizes alone.

What it stores per cond (cond and uncond are separate entries) once a full step has filled it:
- per block: the outputs of self_attn, cross_attn and ffn, tokens x dim each, in the model's
  dtype, and one int32 staleness counter per token;
- the last block's output (tokens x dim), which aggressive steps reuse or forecast;
- with the similarity selector, also the inputs of the two token-wise modules (cross_attn, ffn);
- with forecasting (order 1 linear, 2 quadratic), each of those outputs keeps `order` more
  copies (the divided differences of the last full steps).

tests/test_wan_cache_memory.py checks the formula against a run's measured peak_cache_bytes.

    python scripts/wan_cache_memory.py   # Wan 2.1 14B, 81 frames at 832x480, and Wan 2.2 TI2V 5B
"""


def video_tokens(frames: int, width: int, height: int, spatial_down: int = 8, temporal_down: int = 4, patch: int = 2) -> int:
    """Transformer tokens of one cond: latent frames x latent height / patch x latent width / patch."""
    return ((frames - 1) // temporal_down + 1) * (height // spatial_down // patch) * (width // spatial_down // patch)


def wan_cache_bytes(tokens: int, dim: int, blocks: int, dtype_bytes: int, conds: int = 2, selector: str = "random",
                    forecast_order: int = 0) -> int:
    """Peak cache bytes of a Wan run (modulewise engine: self_attn, cross_attn, ffn per block),
    once a conservative step has run."""
    row = tokens * dim * dtype_bytes
    copies = 1 + forecast_order
    rows = 3 * copies + (2 if selector == "similarity" else 0)
    per_block = rows * row + tokens * 4                     # + int32 staleness
    per_cond = blocks * per_block + copies * row            # + the last block's output
    return conds * per_cond


if __name__ == "__main__":
    runs = {
        "Wan 2.1 14B, 81 frames 832x480, bf16, CFG": (video_tokens(81, 832, 480), 5120, 40),
        "Wan 2.2 TI2V 5B, 121 frames 1280x704, bf16, CFG": (video_tokens(121, 1280, 704, spatial_down=16), 3072, 30),
    }
    for name, (tokens, dim, blocks) in runs.items():
        sizes = ", ".join(f"forecast {forecast} {wan_cache_bytes(tokens, dim, blocks, 2, forecast_order=order) / 2**30:.1f} GiB"
                          for order, forecast in enumerate(("reuse", "linear", "quadratic")))
        print(f"{name}: {tokens} tokens per cond, cache with {sizes}")
