"""Flux-family adapter: Flux.1 dev/schnell, Flux 2, Chroma and HunyuanVideo all
run the DoubleStreamBlock / SingleStreamBlock of comfy.ldm.flux.layers, here
computed through flux_blocks (their own submodules). Conservative steps follow
the research method: modulation is recomputed every step, cached branch
outputs (reused or forecast) are re-gated with the current gate, attention is
not recomputed, and the MLP runs on the selected tokens only.
"""
import torch
import torch.utils.checkpoint

from comfy.ldm.flux.math import apply_rope1

from ...accel_core.config import SELECTORS
from ...accel_core.memory import BlockCache, CacheLayout
from ...accel_core.run import BlockMode
from ...accel_core.schedule import StepKind
from ...accel_core.tokencache import PlanningInput
from . import JOINT_TOKEN_LAYOUT, cross_attn_tokens, latent_tokens, plain_float_copy
from .flux_blocks import (double_block_forward, double_token_mods, finite_fp16, gated, linear_params, mlp_branch,
                          modulate, single_block_forward, single_finish, single_mlp_act, single_mod, take_tokens,
                          token_mods)
from .flux_predictor import FirstBlockRunner, recorded_block, run_block_for_autograd, run_p_step_for_autograd


class FluxFamilyAdapter:
    """How to run the Flux family's blocks in full (filling the cache) and on a
    token subset. Token index space per evaluation: cat(txt, img), the layout of
    the single-stream blocks; double blocks split it at len(txt)."""

    family_key = ""   # set by families.adapter_for
    selectors = SELECTORS
    token_layout = JOINT_TOKEN_LAYOUT

    autograd_through_blocks = True
    output_layer = "final_layer"   # reads the last block's image tokens: what LoRA refinement is trained against

    def __init__(self, diffusion_model, family: str):
        self.family = family
        self.diffusion_model = diffusion_model
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
        self.double_attn_flops = 2 * (linear_params(first_double.img_attn)) if first_double else 0
        self.double_mlp_flops = 2 * (linear_params(first_double.img_mlp)) if first_double else 0
        first_single = self.single_blocks[0]
        self.single_flops = 2 * (linear_params(first_single.linear1) + linear_params(first_single.linear2))

    # -- what the cache will hold ------------------------------------------------
    text_tokens = staticmethod(cross_attn_tokens)

    def cache_layout(self, latent_shape, text_tokens: int, dtype_bytes: int) -> CacheLayout:
        """Double blocks: attention and MLP outputs of each stream; single
        blocks: attention output and block output over cat(txt, img); a
        staleness counter and the selector's input over the joint tokens."""
        img = latent_tokens(latent_shape, self.diffusion_model.patch_size)
        joint = img + text_tokens
        double = BlockCache((img, img, text_tokens, text_tokens), (joint,), (joint,), planned=joint)
        single = BlockCache((joint, joint), (joint,), (joint,), planned=joint)
        return CacheLayout(self.hidden, dtype_bytes, (double,) * len(self.double_blocks) +
                           (single,) * len(self.single_blocks), (joint,))

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
        """A float32 CPU copy of the model's first block (plain_float_copy)."""
        return plain_float_copy(self.double_blocks[0] if self.double_blocks else self.single_blocks[0], for_training)

    def predictor_runner(self) -> FirstBlockRunner:
        return FirstBlockRunner(self.first_block_kind,
                                self._double_flops if self.double_blocks else self._single_block_flops)

    def predictor_parts(self):
        """What load_predictor rebuilds a first-block predictor file around."""
        return self.predictor_block(for_training=False), self.predictor_runner(), self.first_block_kind

    def planning_input(self, args) -> PlanningInput:
        tokens = torch.cat((args["txt"], args["img"]), dim=1) if "txt" in args else args["img"]
        return PlanningInput(tokens, args)

    # -- TokenCache LoRA refinement ------------------------------------------------
    def block_paths(self):
        """(path in the diffusion model, block) of every block, in the run's block numbering."""
        return ([(f"double_blocks.{i}", b) for i, b in enumerate(self.double_blocks)]
                + [(f"single_blocks.{i}", b) for i, b in enumerate(self.single_blocks)])

    def wrap_block(self, model_patcher, block_id: int, wrapper) -> None:
        """Put wrapper(call, args) -> output around block `block_id` of the
        patched clone, where call(args) runs the block as patched so far and
        args is the block's input dict."""
        double = block_id < len(self.double_blocks)
        key = ("double_block", block_id) if double else ("single_block", block_id - len(self.double_blocks))
        earlier = model_patcher.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).get(key)

        def replacement(args, extra):
            if earlier is not None:
                return wrapper(lambda a: earlier(a, extra), args)
            return wrapper(extra["original_block"], args)
        model_patcher.set_model_patch_replace(replacement, "dit", *key)

    def block_layout(self) -> dict:
        return {"double": len(self.double_blocks), "single": len(self.single_blocks)}

    def tokens_in(self, block_id: int, args: dict, count=None) -> torch.Tensor:
        """cat(txt, img) of a block's input dict (a single block's img is joint
        already): the whole planning space, so `count` changes nothing."""
        if block_id < len(self.double_blocks):
            return torch.cat((args["txt"], args["img"]), dim=1)
        return args["img"]

    def tokens_out(self, block_id: int, output: dict, count=None) -> torch.Tensor:
        return self.tokens_in(block_id, output)

    def copy_tokens(self, block_id: int, args: dict, copy=torch.Tensor.clone) -> dict:
        """args with the token inputs copied by `copy` (ComfyUI's blocks add to them in place)."""
        return {**args, **{k: copy(args[k]) for k in ("img", "txt") if k in args}}

    def rest_of_inputs(self, block_id: int, args: dict, count=None) -> dict:
        return {k: v for k, v in args.items() if k not in ("img", "txt")}

    def text_length(self, args) -> int:
        return args["txt"].shape[1] if "txt" in args else 0

    def output_tokens(self, x: torch.Tensor, count: int) -> torch.Tensor:
        """The tokens the output layer reads: the image tokens, after the text."""
        return x[:, -count:]

    def _kind_and_block(self, block_id):
        if block_id < len(self.double_blocks):
            return "double", self.double_blocks[block_id]
        return "single", self.single_blocks[block_id - len(self.double_blocks)]

    def _on_tokens(self, block_id: int, x: torch.Tensor, args: dict, txt_len: int):
        """(kind, block, its args) of block l on the joint tokens x = cat(txt, img)."""
        kind, block = self._kind_and_block(block_id)
        step_args = {**args, "txt": x[:, :txt_len], "img": x[:, txt_len:]} if kind == "double" else {**args, "img": x}
        return kind, block, step_args

    def _no_token_rows(self, block_id: int) -> ValueError:
        return ValueError(f"{self.family} block {block_id}: per-token modulation without a known row for each "
                          "token; train with objective first_order")

    def block_contribution(self, block_id: int, x: torch.Tensor, args: dict, txt_len: int,
                           dtype: torch.dtype) -> torch.Tensor:
        """f_l(x) = block(x) - x for the joint tokens x = cat(txt, img), through
        the model's own block l in the model's `dtype`, with the other inputs it
        got in a recorded evaluation (autograd reaches x; activations are
        recomputed in the backward pass)."""
        x = x.to(dtype)
        kind, block, step_args = self._on_tokens(block_id, x, args, txt_len)
        out = torch.utils.checkpoint.checkpoint(run_block_for_autograd, kind, block, step_args, use_reentrant=False)
        if out is None:
            raise self._no_token_rows(block_id)
        return out - x

    def record_block(self, block_id: int, call, args: dict):
        """(output, branches): the block run as a full step runs it, bit-identical
        to its own forward, with the branch outputs a P-step reuses."""
        out, branches = recorded_block(*self._kind_and_block(block_id), args)
        if out is None:
            raise self._no_token_rows(block_id)
        return out, branches

    def p_step_contribution(self, block_id: int, x: torch.Tensor, args: dict, txt_len: int, dtype: torch.dtype,
                            a: torch.Tensor, cached: dict) -> torch.Tensor:
        """Block l's contribution at a P-step where token t is recomputed to the
        degree a[:, t]: attention from `cached` (the last computed step's
        branches) re-gated, the MLP recomputed or reused (soft), as
        double_block / single_block do with hard selections."""
        x = x.to(dtype)
        kind, block, step_args = self._on_tokens(block_id, x, args, txt_len)
        out = torch.utils.checkpoint.checkpoint(run_p_step_for_autograd, kind, block, step_args, a, cached, txt_len,
                                                use_reentrant=False)
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
            mods = double_token_mods(block, args)
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
        index = run.select(i, tokens, run.selector_scores(i, x_joint), img.device)
        txt_index, img_index = index[index < txt_len], index[index >= txt_len] - txt_len
        img = self._refresh_stream(run, i, "img", img, img_index, block.img_norm2, block.img_mlp, img_mod1, img_mod2)
        txt = finite_fp16(self._refresh_stream(run, i, "txt", txt, txt_index, block.txt_norm2, block.txt_mlp, txt_mod1, txt_mod2))
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
            mods = token_mods(args, "modulation_dims", [single_mod(block, args["vec"])], x)
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
            index = run.select(block_id, tokens, run.selector_scores(block_id, x), x.device)
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
        def rope(t, index):
            return apply_rope1(t, pe if index is None else pe[:, :, index])
        run.keep_selector_feature(block_id, x_joint, q, k, v, rope if pe is not None else None)

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
        x = x + gated(run.estimate(i, stream + "_attn", x.device).to(x.dtype), mod1)
        if index.numel():
            run.scatter_feature(i, stream + "_mlp", index, mlp_branch(x[:, index], norm2, mlp, take_tokens(mod2, index)))
        return x + gated(run.estimate(i, stream + "_mlp", x.device).to(x.dtype), mod2)

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
            mlp = torch.split(block.linear1(modulate(block.pre_norm(x[:, index]), take_tokens(mod, index))),
                              [3 * block.hidden_size, block.mlp_hidden_dim_first], dim=-1)[1]
            attn = run.estimate_tokens(block_id, "attn", index, x.device).to(x.dtype)
            run.scatter_feature(block_id, "out", index, block.linear2(torch.cat((attn, single_mlp_act(block, mlp)), 2)))
        return {"img": single_finish(x, mod, run.estimate(block_id, "out", x.device).to(x.dtype))}
