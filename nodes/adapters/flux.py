"""Flux-family adapter: Flux.1 dev/schnell, Flux 2, Chroma and HunyuanVideo all
run the DoubleStreamBlock / SingleStreamBlock of comfy.ldm.flux.layers.

Everything here is built from the blocks' own submodules (modulation, norms,
qkv, proj, mlp, linear1/2) and ComfyUI's own attention function, so quantised
ops, LoRA weight patches and attention overrides keep applying. Conservative
steps follow the research method: modulation is recomputed every step, cached
branch outputs are re-gated with the current gate, attention is reused, and
the MLP runs on the selected tokens only. Modulation that ComfyUI applies per
token range (Kontext reference images at timestep zero, HunyuanVideo i2v) is
gathered per token, so token subsets work the same way.
"""
import copy
from dataclasses import dataclass

import torch
import torch.func
import torch.utils.checkpoint

from comfy.ldm.flux.layers import ModulationOut, apply_mod
from comfy.ldm.flux.math import apply_rope1, attention

from ...accel_core.config import SELECTORS
from ...accel_core.run import BlockMode
from ...accel_core.schedule import StepKind
from ...accel_core.selectors import attention_scores, norm_scores, sampled_query_indices, similarity_scores
from ...accel_core.tokencache import PlanningInput, map_block_args


def _linear_params(module) -> int:
    return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight") and p.ndim == 2)


def _double_mods(block, vec):
    if block.modulation:
        img_mod1, img_mod2 = block.img_mod(vec)
        txt_mod1, txt_mod2 = block.txt_mod(vec)
        return img_mod1, img_mod2, txt_mod1, txt_mod2
    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = vec
    return img_mod1, img_mod2, txt_mod1, txt_mod2


def _single_mod(block, vec):
    return block.modulation(vec)[0] if block.modulation else vec


def _per_token(mods) -> bool:
    """Modulation with several rows (Kontext timestep-zero references: current t
    and t = 0; HunyuanVideo i2v: guiding frame and the rest) applies per token
    range, through ComfyUI's modulation_dims."""
    return any(m.shift.ndim == 3 and m.shift.shape[1] != 1 for m in mods)


@dataclass(frozen=True)
class TokenModulation:
    """Modulation as ComfyUI applies it with modulation_dims: `mod` holds one
    (shift, scale, gate) row per modulation vector ([B, rows, D]), `rows` the
    row of each token. Rows are gathered where applied, so every token subset
    gets its own."""
    mod: ModulationOut
    rows: torch.Tensor

    def take(self, index):
        return TokenModulation(self.mod, self.rows[index])


def _token_rows(dims, tokens, device):
    """The modulation row of each token from modulation_dims [(start, end, row)];
    None unless every token lies in exactly one range (apply_mod leaves the
    others unmodulated)."""
    rows = torch.zeros(tokens, dtype=torch.long)
    hits = torch.zeros(tokens, dtype=torch.long)
    for start, end, row in dims:
        rows[start:end] = row
        hits[start:end] += 1
    return rows.to(device) if bool((hits == 1).all()) else None


def _token_mods(args, dims_key, mods, x):
    """`mods` as ComfyUI applies them to the tokens of `x`: as they are without
    modulation_dims, as TokenModulation with them; None where modulation has
    several rows and no known token layout. HunyuanVideo passes the dims in the
    block's args. Flux keeps them out of the block-replace args, so they are
    rebuilt as forward_orig builds them from timestep_zero_index: the
    reference-image tokens, last in the sequence, take row 1 (t = 0), the
    others row 0."""
    tokens = x.shape[1]
    dims = args.get(dims_key)
    if dims is None and _per_token(mods):
        references = sum((args.get("transformer_options") or {}).get("reference_image_num_tokens", ()))
        if not 0 < references < tokens:
            return None
        dims = [(0, tokens - references, 0), (tokens - references, tokens, 1)]
    if dims is None:
        return mods
    rows = _token_rows(dims, tokens, x.device)
    return None if rows is None else [TokenModulation(m, rows) for m in mods]


def _double_token_mods(block, args):
    img_mod1, img_mod2, txt_mod1, txt_mod2 = _double_mods(block, args["vec"])
    img_mods = _token_mods(args, "modulation_dims_img", [img_mod1, img_mod2], args["img"])
    txt_mods = _token_mods(args, "modulation_dims_txt", [txt_mod1, txt_mod2], args["txt"])
    return None if img_mods is None or txt_mods is None else (*img_mods, *txt_mods)


def _take(mod, index):
    return mod.take(index) if isinstance(mod, TokenModulation) else mod


def _modulate(x, mod):
    """x * (1 + scale) + shift as apply_mod computes it: fused for one row; per
    token as its per-range in-place ops do (multiply, then add, each result in
    x's dtype), so that the block's output stays bit-identical."""
    if isinstance(mod, TokenModulation):
        scaled = (x * (1 + mod.mod.scale[:, mod.rows])).to(x.dtype)
        return (scaled + mod.mod.shift[:, mod.rows]).to(x.dtype)
    return apply_mod(x, 1 + mod.scale, mod.shift)


def _gated(out, mod):
    if isinstance(mod, TokenModulation):
        return (out * mod.mod.gate[:, mod.rows]).to(out.dtype)
    return apply_mod(out, mod.gate)


def _stream_qkv(norm1, attn, mod, x, heads):
    qkv = attn.qkv(_modulate(norm1(x), mod))
    # explicit head size: a token subset may be empty
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, qkv.shape[-1] // (3 * heads)).permute(2, 0, 3, 1, 4)
    q, k = attn.norm(q, k, v)
    return q, k, v


def _mlp_branch(x, norm2, mlp, mod2):
    return mlp(_modulate(norm2(x), mod2))


def _single_mlp_act(block, mlp):
    if block.yak_mlp:
        half = block.mlp_hidden_dim_first // 2
        return block.mlp_act(mlp[..., half:]) * mlp[..., :half]
    return block.mlp_act(mlp)


def _attention(q, k, v, args):
    return attention(q, k, v, pe=args["pe"], mask=args.get("attn_mask", args.get("attention_mask")),
                     transformer_options=args.get("transformer_options") or {})


def _finish_stream(x, attn_out, norm2, mlp, mod1, mod2):
    x = x + _gated(attn_out, mod1)
    mlp_out = _mlp_branch(x, norm2, mlp, mod2)
    return x + _gated(mlp_out, mod2), mlp_out


def _finite_fp16(x):
    return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504) if x.dtype == torch.float16 else x


def _single_finish(x, mod, output):
    return _finite_fp16(x + _gated(output, mod))


def double_block_forward(block, args, mods=None, on_qkv=None):
    """A DoubleStreamBlock's forward rebuilt from its own submodules, without
    in-place updates (so it can be trained and its branches kept). Returns
    (img, txt, branches): the attention-projection and MLP outputs of both
    streams before gating. Bit-identical to the block's own forward.
    on_qkv(x_joint, q, k, v) sees the joint (txt, img) input and q/k/v."""
    img, txt = args["img"], args["txt"]
    img_mod1, img_mod2, txt_mod1, txt_mod2 = mods if mods is not None else _double_mods(block, args["vec"])
    txt_len = txt.shape[1]
    img_q, img_k, img_v = _stream_qkv(block.img_norm1, block.img_attn, img_mod1, img, block.num_heads)
    txt_q, txt_k, txt_v = _stream_qkv(block.txt_norm1, block.txt_attn, txt_mod1, txt, block.num_heads)
    q, k, v = torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2), torch.cat((txt_v, img_v), dim=2)
    if on_qkv is not None:
        on_qkv(torch.cat((txt, img), dim=1), q, k, v)
    attn = _attention(q, k, v, args)
    del q, k, v
    branches = {"img_attn": block.img_attn.proj(attn[:, txt_len:]), "txt_attn": block.txt_attn.proj(attn[:, :txt_len])}
    img, branches["img_mlp"] = _finish_stream(img, branches["img_attn"], block.img_norm2, block.img_mlp, img_mod1, img_mod2)
    txt, branches["txt_mlp"] = _finish_stream(txt, branches["txt_attn"], block.txt_norm2, block.txt_mlp, txt_mod1, txt_mod2)
    return img, _finite_fp16(txt), branches


def single_block_forward(block, args, mod=None, on_qkv=None):
    """A SingleStreamBlock's forward rebuilt from its own submodules, without
    in-place updates. Returns (x, attention output, linear2 output before
    gating). Bit-identical to the block's own forward."""
    x = args["img"]
    mod = mod if mod is not None else _single_mod(block, args["vec"])
    qkv, mlp = torch.split(block.linear1(_modulate(block.pre_norm(x), mod)),
                           [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, block.num_heads, -1).permute(2, 0, 3, 1, 4)
    del qkv
    q, k = block.norm(q, k, v)
    if on_qkv is not None:
        on_qkv(x, q, k, v)
    attn = _attention(q, k, v, args)
    del q, k, v
    output = block.linear2(torch.cat((attn, _single_mlp_act(block, mlp)), 2))
    return _single_finish(x, mod, output), attn, output


def _run_block(kind, block, args):
    """A double or single block on `args`; the joint tokens cat(txt, img) it
    outputs, or None where its modulation has no known row for every token."""
    if kind == "double":
        mods = _double_token_mods(block, args)
        if mods is None:
            return None
        img, txt, _ = double_block_forward(block, args, mods)
        return torch.cat((txt, img), dim=1)
    mods = _token_mods(args, "modulation_dims", [_single_mod(block, args["vec"])], args["img"])
    return None if mods is None else single_block_forward(block, args, mods[0])[0]


class _BlockCall(torch.nn.Module):
    def __init__(self, kind, block):
        super().__init__()
        self.kind = kind
        self.block = block

    def forward(self, args):
        return _run_block(self.kind, self.block, args)


def _run_block_for_autograd(kind, block, args):
    """_run_block where autograd can reach the inputs: ComfyUI loads weights
    in inference mode, and autograd cannot keep those for the backward pass,
    so the call sees copies of them (one block at a time, made again when the
    backward pass recomputes the block)."""
    copies = {f"block.{name}": p.clone() for name, p in block.named_parameters() if p.is_inference()}
    if not copies:
        return _run_block(kind, block, args)
    return torch.func.functional_call(_BlockCall(kind, block), copies, (args,))


class FirstBlockRunner:
    """How FirstBlockPredictor runs its copy of the model's first block: on the
    first block's own inputs, cast to the copy's dtype."""

    def __init__(self, kind: str, block_flops):
        self.kind = kind
        self.block_flops = block_flops   # tokens -> one row's work, as the adapter counts its first block

    def __call__(self, block, inputs: PlanningInput):
        dtype = next(block.parameters()).dtype
        args = map_block_args(inputs.block_args, lambda t: t.to(dtype) if t.is_floating_point() else t)
        return _run_block(self.kind, block, args)

    def flops(self, block, tokens: int) -> float:
        return self.block_flops(tokens)


class FluxFamilyAdapter:
    """How to run the Flux family's blocks in full (filling the cache) and on a
    token subset. Token index space per evaluation: cat(txt, img), the layout of
    the single-stream blocks; double blocks split it at len(txt)."""

    family_key = ""   # set by families.adapter_for
    selectors = SELECTORS
    tokencache = True   # TokenCache plans from the first block's input, cat(txt, img)

    def __init__(self, diffusion_model, family: str):
        self.family = family
        self.double_blocks = list(diffusion_model.double_blocks)
        self.single_blocks = list(diffusion_model.single_blocks)
        if not self.single_blocks:
            raise ValueError(f"{family} model has no single-stream blocks; token caching needs them to hold the final hidden state")
        skipped = set(getattr(diffusion_model, "skip_dit", ()) or ())
        self.last_single = max(i for i in range(len(self.single_blocks)) if i not in skipped)
        self.hidden = diffusion_model.hidden_size
        self.block_count = len(self.double_blocks) + len(self.single_blocks)
        first_double = self.double_blocks[0] if self.double_blocks else None
        # per-token linear FLOPs (2 per weight) of each part, per stream
        self.double_attn_flops = 2 * (_linear_params(first_double.img_attn)) if first_double else 0
        self.double_mlp_flops = 2 * (_linear_params(first_double.img_mlp)) if first_double else 0
        first_single = self.single_blocks[0]
        self.single_flops = 2 * (_linear_params(first_single.linear1) + _linear_params(first_single.linear2))

    # -- ComfyUI patch entry points ---------------------------------------------
    def install(self, model_patcher, hooks):
        for i in range(len(self.double_blocks)):
            model_patcher.set_model_patch_replace(hooks.block_replace(self.double_block, "double_block", i), "dit", "double_block", i)
        for i in range(len(self.single_blocks)):
            model_patcher.set_model_patch_replace(hooks.block_replace(self.single_block, "single_block", i), "dit", "single_block", i)

    # -- TokenCache ---------------------------------------------------------------
    @property
    def first_block_kind(self) -> str:
        return "double" if self.double_blocks else "single"

    def predictor_block(self, for_training: bool = True) -> torch.nn.Module:
        """A trainable float32 copy of the model's first block on the CPU, as
        plain torch modules (ComfyUI's weight casting and patch hooks off).
        Training starts from its weights, so they must be plain floats then;
        a predictor file overwrites them."""
        block = self.double_blocks[0] if self.double_blocks else self.single_blocks[0]
        odd = sorted({str(p.dtype) for p in block.parameters()
                      if p.dtype not in (torch.float32, torch.float16, torch.bfloat16)})
        if odd and for_training:
            raise ValueError(f"the first-block predictor copies the model's first block, whose weights are "
                             f"{', '.join(odd)}; load the model in fp16, bf16 or fp32, or use architecture mlp_mixer")
        copied = copy.deepcopy(block).to(device="cpu", dtype=torch.float32)
        for module in copied.modules():
            if hasattr(module, "comfy_cast_weights"):
                module.comfy_cast_weights = False
                module.weight_function, module.bias_function = [], []
        return copied.requires_grad_(True)

    def predictor_runner(self) -> FirstBlockRunner:
        return FirstBlockRunner(self.first_block_kind,
                                self._double_flops if self.double_blocks else self._single_block_flops)

    def predictor_parts(self):
        """What load_predictor rebuilds a first-block predictor file around."""
        return self.predictor_block(for_training=False), self.predictor_runner(), self.first_block_kind

    def planning_input(self, args) -> PlanningInput:
        tokens = torch.cat((args["txt"], args["img"]), dim=1) if "txt" in args else args["img"]
        return PlanningInput(tokens, args)

    def block_contribution(self, block_id: int, x: torch.Tensor, args: dict, txt_len: int,
                           dtype: torch.dtype) -> torch.Tensor:
        """f_l(x) = block(x) - x for the joint tokens x = cat(txt, img), through
        the model's own block l in the model's `dtype`, with the other inputs it
        got in a recorded evaluation (autograd reaches x; activations are
        recomputed in the backward pass)."""
        x = x.to(dtype)
        if block_id < len(self.double_blocks):
            kind, block = "double", self.double_blocks[block_id]
            step_args = {**args, "txt": x[:, :txt_len], "img": x[:, txt_len:]}
        else:
            kind, block = "single", self.single_blocks[block_id - len(self.double_blocks)]
            step_args = {**args, "img": x}
        out = torch.utils.checkpoint.checkpoint(_run_block_for_autograd, kind, block, step_args, use_reentrant=False)
        if out is None:
            raise ValueError(f"{self.family} block {block_id}: per-token modulation without a known row for "
                             "each token; train with objective first_order")
        return out - x

    def _attention_flops(self, tokens):
        return 4 * tokens * tokens * self.hidden

    def _double_flops(self, tokens):
        """One row's work in a double block: linear layers per token, and attention."""
        return tokens * (self.double_attn_flops + self.double_mlp_flops) + self._attention_flops(tokens)

    def _single_block_flops(self, tokens):
        return tokens * self.single_flops + self._attention_flops(tokens)

    def double_block(self, run, i, args, original_block, replaced_elsewhere=False):
        block = self.double_blocks[i]
        img, txt = args["img"], args["txt"]
        txt_len, tokens, rows = txt.shape[1], txt.shape[1] + img.shape[1], img.shape[0]
        full_flops = rows * self._double_flops(tokens)
        if i == 0:
            run.plan_tokens(tokens, lambda: self.planning_input(args))
        mods = None

        def unavailable():
            nonlocal mods
            mods = _double_token_mods(block, args)
            return self._unavailable(run, i, args, mods, replaced_elsewhere)
        mode = run.enter_block(i, unavailable=unavailable)
        if mode is BlockMode.ESTIMATE:
            run.leave_block(full_flops, 0, rows * tokens, 0)
            return {"img": img, "txt": txt}
        if mode is BlockMode.FALLBACK:
            run.leave_block(full_flops, full_flops, rows * tokens, rows * tokens)
            return original_block(args)
        if mode is BlockMode.FULL:
            out = self._double_full(run, i, block, args, mods)
            run.leave_block(full_flops, full_flops, rows * tokens, rows * tokens)
            return out

        img_mod1, img_mod2, txt_mod1, txt_mod2 = mods
        x_joint = torch.cat((txt, img), dim=1)
        index = run.select(i, tokens, self._scores(run, i, x_joint), img.device)
        txt_index, img_index = index[index < txt_len], index[index >= txt_len] - txt_len
        img = self._refresh_stream(run, i, "img", img, img_index, block.img_norm2, block.img_mlp, img_mod1, img_mod2)
        txt = _finite_fp16(self._refresh_stream(run, i, "txt", txt, txt_index, block.txt_norm2, block.txt_mlp, txt_mod1, txt_mod2))
        run.leave_block(full_flops, rows * index.numel() * self.double_mlp_flops, rows * tokens, rows * index.numel())
        return {"img": img, "txt": txt}

    def single_block(self, run, i, args, original_block, replaced_elsewhere=False):
        block = self.single_blocks[i]
        block_id = len(self.double_blocks) + i
        x = args["img"]
        tokens, rows = x.shape[1], x.shape[0]
        full_flops = rows * self._single_block_flops(tokens)
        last = i == self.last_single
        if block_id == 0:
            run.plan_tokens(tokens, lambda: self.planning_input(args))
        mods = None

        def unavailable():
            nonlocal mods
            mods = _token_mods(args, "modulation_dims", [_single_mod(block, args["vec"])], x)
            return self._unavailable(run, block_id, args, mods, replaced_elsewhere)
        mode = run.enter_block(block_id, unavailable=unavailable)
        if mode is BlockMode.ESTIMATE:
            run.leave_block(full_flops, 0, rows * tokens, 0)
            return {"img": run.get_final(x.device, x.dtype) if last else x}
        if mode is BlockMode.FALLBACK:
            run.leave_block(full_flops, full_flops, rows * tokens, rows * tokens)
            out = original_block(args)
        elif mode is BlockMode.FULL:
            out = self._single_full(run, block_id, block, args, mods[0])
            run.leave_block(full_flops, full_flops, rows * tokens, rows * tokens)
        else:
            index = run.select(block_id, tokens, self._scores(run, block_id, x), x.device)
            out = self._single_subset(run, block_id, block, args, mods[0], index)
            run.leave_block(full_flops, rows * index.numel() * self.single_flops, rows * tokens, rows * index.numel())
        if last and run.plan.fill:
            run.put_final(out["img"])
        return out

    # -- checks -----------------------------------------------------------------
    def _unavailable(self, run, block_id, args, mods, replaced_elsewhere):
        """Why a block cannot run cached and computes in full instead; None
        where it can. `mods` is None where modulation has an unknown token
        layout."""
        patches = (args.get("transformer_options") or {}).get("patches", {})
        reason = None
        if replaced_elsewhere:
            reason = "a block replacement from another node"
        elif run.plan.kind is StepKind.CONSERVATIVE and not run.has(block_id, "staleness"):
            reason = "no cache from the last full step"
        elif mods is None:
            reason = "per-token modulation without a known row for each token"
        elif patches.get("attn1_patch") or patches.get("attn1_output_patch"):
            reason = "another node patches this model's attention"
        return None if reason is None else f"{self.family} blocks with {reason} compute in full"

    # -- selection features ---------------------------------------------------------
    def _keep_features(self, run, block_id, x_joint, q, k, v, pe):
        selector = run.config.selector
        if selector == "v_norm":
            run.put(block_id, "score", norm_scores(v))
        elif selector == "k_norm":
            run.put(block_id, "score", norm_scores(k))
        elif selector == "similarity":
            run.put(block_id, "input", x_joint)
        elif selector == "attention":
            sample = sampled_query_indices(q.shape[2], run.config.attention_queries, run.config.seed, block_id).to(q.device)
            q_sample = q[:, :, sample]
            if pe is not None:
                q_sample = apply_rope1(q_sample, pe[:, :, sample])
                k = apply_rope1(k, pe)
            run.put(block_id, "score", attention_scores(q_sample, k))

    def _scores(self, run, block_id, x_joint):
        selector = run.config.selector
        if selector == "random":
            return None
        if selector == "similarity":
            return similarity_scores(x_joint, run.get(block_id, "input", x_joint.device))
        return run.get(block_id, "score", x_joint.device)

    # -- full compute that fills the cache ---------------------------------------
    def _double_full(self, run, i, block, args, mods):
        def keep(x_joint, q, k, v):
            self._keep_features(run, i, x_joint, q, k, v, args["pe"])
        img, txt, branches = double_block_forward(block, args, mods, on_qkv=keep)
        run.note_change(i, [("txt_mlp", branches["txt_mlp"]), ("img_mlp", branches["img_mlp"])])
        for name, branch in branches.items():
            run.put_feature(i, name, branch)
        run.reset_staleness(i, txt.shape[1] + img.shape[1], img.device)
        return {"img": img, "txt": txt}

    def _refresh_stream(self, run, i, stream, x, index, norm2, mlp, mod1, mod2):
        """Cached attention output (estimated at this step) re-gated for every
        token; the MLP recomputed for the selected tokens on their current
        input and written back, the others' estimated."""
        x = x + _gated(run.estimate(i, stream + "_attn", x.device).to(x.dtype), mod1)
        if index.numel():
            run.scatter_feature(i, stream + "_mlp", index, _mlp_branch(x[:, index], norm2, mlp, _take(mod2, index)))
        return x + _gated(run.estimate(i, stream + "_mlp", x.device).to(x.dtype), mod2)

    def _single_full(self, run, block_id, block, args, mod):
        def keep(x_joint, q, k, v):
            self._keep_features(run, block_id, x_joint, q, k, v, args["pe"])
        x, attn, output = single_block_forward(block, args, mod, on_qkv=keep)
        run.note_change(block_id, [("out", output)])
        run.put_feature(block_id, "attn", attn)
        run.put_feature(block_id, "out", output)
        run.reset_staleness(block_id, x.shape[1], x.device)
        return {"img": x}

    def _single_subset(self, run, block_id, block, args, mod, index):
        """Selected tokens: MLP half of linear1 on their current input, joined
        with their cached attention output (estimated at this step) through
        linear2. Every token adds the current gate times the (partly refreshed,
        otherwise estimated) cached output."""
        x = args["img"]
        if index.numel():
            mlp = torch.split(block.linear1(_modulate(block.pre_norm(x[:, index]), _take(mod, index))),
                              [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)[1]
            attn = run.estimate_tokens(block_id, "attn", index, x.device).to(x.dtype)
            run.scatter_feature(block_id, "out", index, block.linear2(torch.cat((attn, _single_mlp_act(block, mlp)), 2)))
        return {"img": _single_finish(x, mod, run.estimate(block_id, "out", x.device).to(x.dtype))}
