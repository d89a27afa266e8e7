"""One call puts psa into a diffusers video transformer:

    import psa.integrations.diffusers as psa_diffusers
    psa_diffusers.apply(pipe.transformer, psa.PSAConfig(), warmup_steps=12)
    video = pipe(prompt).frames
    print(psa_diffusers.stats(pipe.transformer))   # density / coverage per layer and step
    psa_diffusers.remove(pipe.transformer)

Supported (diffusers 0.42.1): `WanTransformer3DModel` (Wan2.1, Wan2.2; for the two-expert A14B
pipeline apply to `pipe.transformer`, then to `pipe.transformer_2` with
`share_steps_with=pipe.transformer`), `CogVideoXTransformer3DModel` and
`HunyuanVideoTransformer3DModel`. Video self-attention runs through `psa.sparse_attention`; Wan's
cross-attention to text (and its I2V image context) stays dense. CogVideoX attends over `[text | video]`
jointly: the text tokens are forced keys and forced query rows (docs/spec.md section 5), so every video row sees
all of the text and every text row sees everything, and they stay out of the token permutation.
HunyuanVideo attends over `[video | text]` with padded text keys masked out; psa cannot drop single
keys, so video-to-video runs through psa, video-to-text and text rows run dense, and the two softmaxes
of a video row are merged exactly through their log-sum-exps (see `_Route.attend_text_last`).

How it hooks in. Wan and HunyuanVideo: each patched processor gets a route object as its `_attention_backend`, and the
module's `dispatch_attention_fn` is wrapped once so that a call carrying a route goes to psa and every
other call (other models, cross-attention, warm-up steps) goes to diffusers' dispatcher unchanged.
CogVideoX's processor calls `F.scaled_dot_product_attention` itself, so its self-attention processors are
replaced by one that projects q, k, v with the module's own layers and rotary embedding and attends with
psa (and calls the original processor whenever psa is not to run). The latent grid comes from the
transformer's input shape and patch size; q, k, v are permuted into `order` (psa.layout) and back. On Wan
the blocks' hidden states are held in that order instead while psa is active (`keep_order`, the default):
the patch tokens, rotary tables and per-token timesteps are permuted once per forward and the output
projection's output put back, which saves four gathers per layer; CogVideoX alike, Wan under context
parallelism too.

Dense warm-up counts denoising steps from the transformer's forward calls and their timestep: a
smaller timestep than the previous call is the next step, an equal one is the same step (classifier-free
guidance run as a second pass), a larger one starts a new generation. Reading the timestep is one host
read per transformer forward, done only when `warmup_steps > 0`.

Context parallelism (diffusers' `transformer.enable_parallelism(config=ContextParallelConfig(...))`, called
before `apply`): in Ulysses mode every rank gathers the whole sequence for its share of the heads, so psa
runs there unchanged, per rank on its heads, with the level maps of one GPU (diffusers' own all-to-all
moves the tensors). Ring mode splits the keys across ranks while psa estimates its level map over all
keys; it raises, as does Ulysses-anything (uneven splits). Of the supported models only Wan has a
context-parallel plan in diffusers 0.42.1.

torch.compile: `torch.compile(transformer, fullgraph=True)` traces a patched model whole when
`warmup_steps == 0`; with `dynamic=True` a new latent size reuses the compiled graphs (the grid reaches
traced code as a tensor shape, symbolic there). With warm-up, compile the blocks (`transformer.compile_repeated_blocks(
fullgraph=True)`, diffusers' regional compilation): the step bookkeeping then stays in eager code and
each block class compiles to one dense and one psa graph, not one per step or layer.
"""

from __future__ import annotations

import sys
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from .. import layout as _layout
from ..config import PSAConfig
from ..reference import LEVEL_VALUES
from ..ops import sparse_attention
from ..stats import counts_summary

_ATTRIBUTE = "_psa_state"


@dataclass
class StepCounter:
    """Denoising steps from a transformer's forward timesteps: a smaller timestep than the previous
    forward's is the next step, an equal one the same step (classifier-free guidance run as a second
    pass), a larger one starts a new generation at step 0. Shared by apply() and psa.tools.capture."""

    step: int = 0
    last_timestep: Optional[float] = None
    generation: int = 0          # counts "new": transformers sharing the counter see a new generation

    def advance(self, timestep: torch.Tensor) -> str:
        """Counts this forward (one host read); returns "new", "next" or "same"."""
        value = float(timestep.detach().max())
        if self.last_timestep is None or value > self.last_timestep:
            self.step, change = 0, "new"
            self.generation += 1
        elif value < self.last_timestep:
            self.step, change = self.step + 1, "next"
        else:
            change = "same"
        self.last_timestep = value
        return change


def forward_timestep(adapter, args, kwargs) -> torch.Tensor:
    """The `timestep` argument of a supported transformer's forward."""
    return kwargs["timestep"] if "timestep" in kwargs else args[adapter.timestep_position]


def forward_hidden_states(args, kwargs) -> torch.Tensor:
    """The `hidden_states` argument (the latents) of a supported transformer's forward."""
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@dataclass(eq=False)  # hashed by identity: kept in a WeakSet
class _State:
    """Everything psa keeps for one patched transformer.

    What the attention calls read while they may be traced by torch.compile is limited to values that
    change rarely (`grid`, `active`, the config), so compiled regions are not specialised per step or
    per layer. Level counts go into a device table indexed by a device-side call counter: layer i of a
    forward is the i-th psa call, with no Python constant per layer."""

    configs: Dict[int, PSAConfig]                             # per patched block index
    order: str
    tile: Sequence[int]
    warmup_steps: int
    collect_stats: bool
    adapter: "_Adapter"
    layers: Sequence[int]                                      # patched block indices, in call order
    # The latent grid (T, H, W) as the shape of an empty tensor [T, H, W, 0]: compiled code reads its
    # sizes, which torch.compile(dynamic=True) keeps symbolic, so a new grid is not a recompile (a tuple
    # of ints would be guarded on value).
    grid_shape: Optional[torch.Tensor] = None
    active: bool = True                                        # psa runs now (False during warm-up)
    steps: StepCounter = field(default_factory=StepCounter)   # shared between the experts of one pipeline
    generation: int = 0                                        # the counter's generation last seen here
    last_step: int = 0                                         # the step this transformer last ran
    shares_steps: bool = False                                 # its counter serves another transformer too
    counts: Optional[torch.Tensor] = None                      # [len(layers), 5] level counts, this step
    call: Optional[torch.Tensor] = None                        # device scalar: psa calls this forward
    history: List[tuple] = field(default_factory=list)         # (step, counts) of finished steps
    restore: List[Callable[[], None]] = field(default_factory=list)
    hook: object = None
    # keep_order is installed: while psa is active the blocks' hidden states are held in `order`, so
    # psa's calls need no permutation (warm-up steps run the blocks in the model's own order).
    keep_order: bool = False

    def allocate_counts(self, device: torch.device) -> None:
        self.counts = torch.zeros(len(self.layers), len(LEVEL_VALUES), dtype=torch.long, device=device)
        self.call = torch.zeros((), dtype=torch.long, device=device)
        if not torch.compiler.is_compiling():
            # Fixed sizes: under torch.compile(dynamic=True) a dynamic [layers, 5] table would be unified
            # with any input size that happens to equal it (duck sizing), and recompile when that changes.
            torch._dynamo.mark_static(self.counts)

    def begin_forward(self, device: torch.device) -> None:
        if self.counts is None or self.counts.device != device:
            self.allocate_counts(device)
        self.call.zero_()

    @property
    def step(self) -> int:
        return self.steps.step

    def observe(self, timestep: torch.Tensor) -> None:
        """Advance the step counter from this forward's timestep (one host read). With a counter shared
        by several transformers (the experts of Wan2.2) the step is the pipeline's, whichever ran."""
        self.steps.advance(timestep)
        if self.generation != self.steps.generation:
            self.history.clear()
            self.counts.zero_()
            self.generation = self.steps.generation
        elif self.steps.step != self.last_step:
            self.history.append((self.last_step, self.counts.clone()))
            self.counts.zero_()
        self.last_step = self.steps.step
        self.active = self.step >= self.warmup_steps

    def record(self, levels: torch.Tensor) -> None:
        counts = torch.stack([(levels == level).sum() for level in LEVEL_VALUES])
        self.counts.index_add_(0, (self.call % len(self.layers)).view(1), counts.view(1, -1))
        self.call.add_(1)


def _token_order(state: "_State", device: torch.device, text: int = 0) -> _layout.TokenLayout:
    """psa's token order (`state.order`) over this forward's latent grid, after `text` leading text tokens."""
    return _layout.get_layout(tuple(state.grid_shape.shape[:3]), state.order, tile=state.tile, text_before=text,
                              device=device)


class _Route:
    """Decides when psa runs and runs it; shared by the patched layers of one model that have the
    same config and fallback backend."""

    def __init__(self, state: _State, config: PSAConfig, fallback_backend=None):
        self.state, self.config, self.fallback_backend = state, config, fallback_backend

    def grid(self) -> Optional[tuple]:
        shape = self.state.grid_shape
        return None if shape is None else tuple(shape.shape[:3])

    def video_tokens(self) -> int:
        grid = self.grid()
        return 0 if grid is None else grid[0] * grid[1] * grid[2]

    def handles(self, length: int, text: int = 0) -> bool:
        """Whether self-attention over `length` tokens (`text` of them text) goes to psa now."""
        grid = self.grid()
        if grid is None or not self.state.active:
            return False
        return length == grid[0] * grid[1] * grid[2] + text

    def attend(self, q, k, v, scale=None, text: int = 0, return_lse: bool = False, record: bool = True):
        """psa over `[B, H, L, D]` tensors whose first `text` tokens are text: those are forced keys and
        forced query rows (docs/spec.md section 5) and stay out of the token permutation. `record`:
        count the level map in stats() (not for a backward's recomputation)."""
        state = self.state
        order = None
        if not state.keep_order:  # attend runs only while psa is active: then the blocks are in order
            order = _token_order(state, q.device, text)
            q, k, v = (order.permute(x, dim=2) for x in (q, k, v))
        forced = _layout.text_positions(q.shape[2], text_before=text, device=q.device)
        out, lse, levels = sparse_attention(q, k, v, self.config, scale=scale, force_keys=forced,
                                            force_queries=forced, return_lse=True, return_levels=True)
        if state.collect_stats and record:
            state.record(levels)
        if order is None:
            return (out, lse) if return_lse else out
        out = order.unpermute(out, dim=2)
        return (out, order.unpermute(lse, dim=2)) if return_lse else out

    def attend_text_last(self, q, k, v, key_mask, scale=None):
        """Joint attention over `[video | text]` (`[B, H, L, D]`) whose text keys may be padding
        (`key_mask [B, L]`, True = real key), as HunyuanVideo runs it. psa cannot drop single keys, so
        the work splits exactly: video rows attend to video keys with psa and to the real text keys
        densely, the two softmaxes merged through their log-sum-exps (every video row sees all of the
        text: forced keys); text rows attend densely to every real key (forced rows)."""
        video = self.video_tokens()
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        q_video, k_video, v_video = q[:, :, :video], k[:, :, :video], v[:, :, :video]
        k_text, v_text, text_mask = k[:, :, video:], v[:, :, video:], key_mask[:, None, None, video:]
        out_video, lse_video = self.attend(q_video, k_video, v_video, scale, return_lse=True)
        out_text, lse_text = _dense_with_lse(q_video, k_text, v_text, text_mask, scale)
        total = torch.logaddexp(lse_video, lse_text)
        weight_video = torch.exp(lse_video - total).nan_to_num(0.0)[..., None]
        weight_text = torch.exp(lse_text - total).nan_to_num(0.0)[..., None]
        rows_video = (out_video.float() * weight_video + out_text.float() * weight_text).to(q.dtype)
        rows_text = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, video:], k, v, attn_mask=key_mask[:, None, None, :], scale=scale)
        return torch.cat([rows_video, rows_text], dim=2)


# One opaque op under torch.compile: its row chunks are a Python loop over the sequence length, which
# traced code would specialise on (one recompile per latent size).
@torch.library.custom_op("psa_integrations::dense_with_lse", mutates_args=())
def _dense_with_lse_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float,
                       rows_per_chunk: int) -> Tuple[torch.Tensor, torch.Tensor]:
    outs, lses = [], []
    for start in range(0, q.shape[2], rows_per_chunk):
        logits = (q[:, :, start:start + rows_per_chunk].float() @ k.float().transpose(-1, -2)) * scale
        logits = logits.masked_fill(~key_mask, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.exp(logits - lse[..., None]).nan_to_num(0.0)   # rows with no real key: zeros
        outs.append(probs @ v.float())
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@_dense_with_lse_op.register_fake
def _dense_with_lse_fake(q, k, v, key_mask, scale, rows_per_chunk):
    rows = q.shape[:3]
    return q.new_empty((*rows, v.shape[-1]), dtype=torch.float32), q.new_empty(rows, dtype=torch.float32)


def _dense_with_lse(q, k, v, key_mask, scale, rows_per_chunk: int = 4096):
    """Masked dense attention of many rows over few keys, with its log-sum-exp (float32): rows in chunks,
    so the logits never take more than `rows_per_chunk x keys` per head. `key_mask` broadcasts to
    `[B, H, 1, keys]`."""
    return _dense_with_lse_op(q, k, v, key_mask, float(scale), rows_per_chunk)


# --------------------------------------------------------------------------------------------------
# Wan: the dispatcher wrapper, installed once per diffusers module whose processors carry routes
# --------------------------------------------------------------------------------------------------

# Per diffusers module: the states of the models patched through it. The wrapper is removed when the
# last of them is removed (a model dropped without remove() leaves a wrapper that only forwards).
_live_states: Dict[str, weakref.WeakSet] = {}


def _key_mask(attn_mask, batch: int, length: int):
    """A bool key mask `[B, L]` from an `attn_mask` that masks keys only (`[B, 1, 1, L]` bool, as
    HunyuanVideo builds it), else None."""
    if attn_mask is None or attn_mask.dtype != torch.bool or attn_mask.dim() != 4:
        return None
    if attn_mask.shape[1] != 1 or attn_mask.shape[2] != 1 or attn_mask.shape[3] != length:
        return None
    return attn_mask.reshape(attn_mask.shape[0], length).expand(batch, length)


def _install_dispatch(module_name: str) -> None:
    module = sys.modules[module_name]
    original = module.dispatch_attention_fn
    if getattr(original, "_psa_original", None) is not None:
        return

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        if isinstance(backend, _Route):
            # diffusers holds [B, L, H, D]; psa takes [B, H, L, D] (a view, no copy).
            q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
            ulysses = _ulysses_degree(parallel_config)
            if ulysses > 1:
                # Each rank holds 1/ulysses of the sequence here; psa runs after the all-to-all.
                if (not is_causal and dropout_p == 0.0 and attn_mask is None and key.shape[1] == query.shape[1]
                        and backend.handles(query.shape[1] * ulysses)):
                    return _ulysses_attention(backend, query, key, value, scale, parallel_config)
            elif not is_causal and dropout_p == 0.0 and key.shape[1] == query.shape[1]:
                if attn_mask is None and backend.handles(query.shape[1]):
                    return backend.attend(q, k, v, scale).transpose(1, 2)
                key_mask = _key_mask(attn_mask, query.shape[0], query.shape[1])
                text = query.shape[1] - backend.video_tokens()
                if key_mask is not None and text > 0 and backend.handles(query.shape[1], text):
                    return backend.attend_text_last(q, k, v, key_mask, scale).transpose(1, 2)
            backend = backend.fallback_backend
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                        parallel_config=parallel_config)

    dispatch_attention_fn._psa_original = original
    module.dispatch_attention_fn = dispatch_attention_fn


def _context_parallel_config(parallel_config):
    """The ContextParallelConfig inside diffusers' ParallelConfig (None without context parallelism):
    what `dispatch_attention_fn` receives, or a transformer's `_parallel_config`."""
    return getattr(parallel_config, "context_parallel_config", None) if parallel_config is not None else None


def _ulysses_degree(parallel_config) -> int:
    """How many ranks split the sequence under diffusers' context parallelism (1 without it); raises for
    the modes psa cannot run in."""
    context = _context_parallel_config(parallel_config)
    if context is None:
        return 1
    if context.ring_degree > 1:
        raise ValueError("psa runs under diffusers context parallelism in Ulysses mode only "
                         f"(ContextParallelConfig(ulysses_degree=N)), got ring_degree={context.ring_degree}: ring "
                         "attention splits the keys across ranks, and psa estimates its level map over all keys")
    if context.ulysses_anything:
        raise ValueError("psa needs the sequence split evenly across the Ulysses ranks: ContextParallelConfig("
                         "ulysses_anything=True) is not supported")
    return context.ulysses_degree


def _ulysses_attention(route: _Route, query, key, value, scale, parallel_config):
    """psa under Ulysses context parallelism: diffusers' all-to-all gives this rank the whole sequence for
    its share of the heads (`[B, L, H / N, D]`, tokens in order), psa attends, the all-to-all returns the
    rank's sequence slice for every head."""
    try:
        from diffusers.models.attention_dispatch import _templated_context_parallel_attention
    except ImportError as error:  # a diffusers without the templated context-parallel attention
        raise RuntimeError("psa's context-parallel path needs diffusers' _templated_context_parallel_attention "
                           "(diffusers 0.42)") from error

    def forward_op(ctx, q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse, _save_ctx=True,
                   _parallel_config=None):
        if _save_ctx:
            ctx.save_for_backward(q, k, v)
            ctx.psa_scale = scale
        out = route.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, return_lse=return_lse)
        if return_lse:
            return out[0].transpose(1, 2), out[1].transpose(1, 2)
        return out.transpose(1, 2)

    def backward_op(ctx, grad_out, *args, **kwargs):
        # diffusers' own recipe for its native op: recompute the attention under autograd and differentiate
        # it (psa's estimate reads the same q and k, so the level map is the forward's).
        q, k, v = (x.detach().requires_grad_(True) for x in ctx.saved_tensors)
        with torch.enable_grad():
            out = route.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), ctx.psa_scale, record=False)
            return torch.autograd.grad(out.transpose(1, 2), (q, k, v), grad_out)

    return _templated_context_parallel_attention(query, key, value, None, 0.0, False, scale, False, False,
                                                 forward_op=forward_op, backward_op=backward_op,
                                                 _parallel_config=parallel_config)


def _shared_route(state: _State, config: PSAConfig, fallback_backend=None) -> _Route:
    """The model's route for this config and fallback backend: one object for all layers that share
    them, so torch.compile has nothing per layer to specialise on (per-layer configs: one per config)."""
    routes = state.__dict__.setdefault("_routes", {})
    key = (config, id(fallback_backend) if fallback_backend is not None else None)
    if key not in routes:
        routes[key] = _Route(state, config, fallback_backend)
    return routes[key]


def _route_through_dispatch(state: _State, attention, config: PSAConfig) -> None:
    processor = attention.processor
    module_name = type(processor).__module__
    route = _shared_route(state, config, processor._attention_backend)
    processor._attention_backend = route
    _install_dispatch(module_name)
    _live_states.setdefault(module_name, weakref.WeakSet()).add(state)

    def restore():
        processor._attention_backend = route.fallback_backend
        _live_states[module_name].discard(state)
        module = sys.modules[module_name]
        original = getattr(module.dispatch_attention_fn, "_psa_original", None)
        if not _live_states[module_name] and original is not None:
            module.dispatch_attention_fn = original

    state.restore.append(restore)


# --------------------------------------------------------------------------------------------------
# CogVideoX: a processor for joint [text | video] self-attention
# --------------------------------------------------------------------------------------------------

class _JointTextFirstProcessor:
    """Self-attention over `[text | video]` with psa; the original processor whenever psa does not run."""

    def __init__(self, original, route: _Route):
        self.original, self.route = original, route

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        text = encoder_hidden_states.shape[1]
        if attention_mask is not None or not self.route.handles(hidden_states.shape[1] + text, text):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (projection(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                   for projection in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb
            q = torch.cat([q[:, :, :text], apply_rotary_emb(q[:, :, text:], image_rotary_emb)], dim=2)
            k = torch.cat([k[:, :, :text], apply_rotary_emb(k[:, :, text:], image_rotary_emb)], dim=2)
        out = self.route.attend(q, k, v, text=text).transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text:], out[:, :text]


def _replace_processor(state: _State, attention, config: PSAConfig) -> None:
    original = attention.processor
    attention.processor = _JointTextFirstProcessor(original, _shared_route(state, config))

    def restore():
        attention.processor = original

    state.restore.append(restore)


# --------------------------------------------------------------------------------------------------
# Model adapters
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Adapter:
    attentions: Callable          # transformer -> its video self-attention modules, one per block
    grid: Callable                # (transformer, hidden_states) -> latent grid (T, H, W) after patching
    timestep_position: int        # positional index of `timestep` in forward()
    install: Callable             # (state, attention module, its PSAConfig) -> None
    keep_order: Optional[Callable] = None  # (state, transformer) -> None: hooks that hold the blocks in order
    keep_order_in_parallel: bool = False   # the hooks hold under diffusers' context parallelism too


def _wan_keep_order(state: _State, transformer) -> None:
    """Wan's blocks see only per-token operations besides attention, so their hidden states can stay in
    psa's token order from the first block to the last: the patch embedding's tokens are permuted once
    (its output, before the transformer flattens it), the rotary tables and Wan2.2 TI2V's per-token
    timesteps alike, and the output projection's output is put back. Attention is
    permutation-equivariant when q, k and v are permuted together, so dense layers give the same result
    up to rounding; psa's calls then skip four gathers per layer (q, k, v, out: about 0.5 ms a layer at
    Wan2.1-1.3B's 32760 tokens on an H200, RESULTS.md). The hooks sit on modules outside the blocks, so
    regional compilation (compile_repeated_blocks) still compiles one block graph per mode, and only
    while psa is active: a warm-up step runs exactly as the unpatched model.

    Under diffusers' context parallelism the tokens are permuted before diffusers splits the sequence
    across ranks (the patch embedding's output reaches the first block's splitter, the timesteps the
    transformer's), so a rank's slice and the all-to-all's whole sequence are in psa's order too; only
    the rotary tables are split inside their module, before a forward hook sees them, so there the
    whole tables are recomputed, permuted and split the way diffusers splits them (rope_hook)."""
    parallel = _context_parallel_config(getattr(transformer, "_parallel_config", None))
    if parallel is not None:
        from diffusers.hooks.context_parallel import EquipartitionSharder

    def patches_hook(module, args, output):  # [B, C, F, H, W]: the transformer flattens (F, H, W) into tokens
        if not state.active:
            return None
        order = _token_order(state, output.device)
        return order.permute(output.flatten(2), dim=2).view_as(output)

    def rope_hook(module, args, output):  # (cos, sin), each [1, L, 1, D] (a rank's [1, L / N, 1, D] in parallel)
        if not state.active:
            return None
        order = _token_order(state, output[0].device)
        if order.is_identity:
            return None
        if parallel is not None:  # the class's forward, without the instance's splitting hook
            output = type(module).forward(module, *args)
        # Scattered into a fresh table (permuted[inverse[i]] = x[i], the same values as x[:, forward]),
        # not gathered: a gather fuses into the rotary application's even / odd column masks, and
        # Inductor's C++ backend emits a bounds check there that does not compile (`VecMask<int64_t,2>(bool&)`,
        # torch 2.11 to 2.13; pytorch/pytorch#178244, #187335). The scatter's output is realized, so the
        # blocks read a plain table. The tables are small: the form costs nothing.
        def permuted(x):
            table = torch.empty_like(x)
            table[:, order.inverse] = x
            if parallel is not None:  # Wan's plan splits the rotary outputs along the tokens (dim 1)
                table = EquipartitionSharder.shard(table, 1, parallel._flattened_mesh)
            return table

        return tuple(permuted(x) for x in output)

    def timestep_hook(module, args, kwargs):  # the transformer's forward, after psa's own pre-hook
        # Wan2.2 TI2V: a timestep per token [B, L]; in psa's order, its projection and the output norm's
        # per-token modulation follow the tokens (and diffusers splits it as it splits the tokens).
        if not state.active:
            return None
        timestep = forward_timestep(state.adapter, args, kwargs)
        if timestep.ndim != 2:
            return None
        timestep = _token_order(state, timestep.device).permute(timestep, dim=1)
        if "timestep" in kwargs:
            return args, {**kwargs, "timestep": timestep}
        position = state.adapter.timestep_position
        return (*args[:position], timestep, *args[position + 1:]), kwargs

    def output_hook(module, args, output):  # proj_out's [B, L, C] (gathered from the ranks in parallel)
        if not state.active:
            return None
        return _token_order(state, output.device).unpermute(output, dim=1)

    _install_keep_order(state, [transformer.patch_embedding.register_forward_hook(patches_hook),
                                transformer.rope.register_forward_hook(rope_hook),
                                transformer.register_forward_pre_hook(timestep_hook, with_kwargs=True),
                                transformer.proj_out.register_forward_hook(output_hook)])


def _cogvideox_keep_order(state: _State, transformer) -> None:
    """CogVideoX's blocks take the video tokens and the text separately and join them only inside
    attention, so the video tokens can stay in psa's order as Wan's do (_wan_keep_order): the patch
    embedding's video part is permuted once, the rotary tables (a forward argument) alike, and the
    final norm's input (the video tokens) put back. Only while psa is active."""

    def rotary_hook(module, args, kwargs):  # the transformer's forward; runs after psa's own pre-hook
        if not state.active:
            return None
        by_name = "image_rotary_emb" in kwargs
        rotary = kwargs["image_rotary_emb"] if by_name else (args[5] if len(args) > 5 else None)
        if rotary is None:
            return None
        permuted = tuple(_token_order(state, x.device).permute(x, dim=0) for x in rotary)  # (cos, sin), each [L, D]
        if by_name:
            return args, {**kwargs, "image_rotary_emb": permuted}
        return (*args[:5], permuted, *args[6:]), kwargs

    def patches_hook(module, args, output):  # patch_embed(text, video) -> [B, text + video, C]
        if not state.active:
            return None
        text = args[0].shape[1]
        return torch.cat([output[:, :text], _token_order(state, output.device).permute(output[:, text:], dim=1)], dim=1)

    _install_keep_order(state, [transformer.register_forward_pre_hook(rotary_hook, with_kwargs=True),
                                transformer.patch_embed.register_forward_hook(patches_hook),
                                transformer.norm_final.register_forward_pre_hook(_leave_blocks(state))])


def _leave_blocks(state: _State):
    """A forward pre-hook for the norm after the blocks: its input, the video tokens [B, L, C], back in
    the model's order."""
    def hook(module, args):
        if not state.active:
            return None
        return (_token_order(state, args[0].device).unpermute(args[0], dim=1), *args[1:])
    return hook


def _install_keep_order(state: _State, handles) -> None:
    state.keep_order = True

    def restore():
        for handle in handles:
            handle.remove()
        state.keep_order = False

    state.restore.append(restore)


def _wan_grid(transformer, hidden):
    p_t, p_h, p_w = transformer.config.patch_size
    frames, height, width = hidden.shape[-3:]                 # [B, C, F, H, W]
    return (frames // p_t, height // p_h, width // p_w)


def _hunyuan_grid(transformer, hidden):
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t
    frames, height, width = hidden.shape[-3:]                 # [B, C, F, H, W]
    return (frames // p_t, height // p, width // p)


def _hunyuan_attentions(transformer):
    return ([block.attn for block in transformer.transformer_blocks] +
            [block.attn for block in transformer.single_transformer_blocks])


def _cogvideox_grid(transformer, hidden):
    p, p_t = transformer.config.patch_size, transformer.config.patch_size_t or 1
    frames, height, width = hidden.shape[1], hidden.shape[3], hidden.shape[4]   # [B, F, C, H, W]
    return (frames // p_t, height // p, width // p)


_ADAPTERS = {
    "WanTransformer3DModel": _Adapter(lambda t: [block.attn1 for block in t.blocks], _wan_grid, 1,
                                      _route_through_dispatch, _wan_keep_order, keep_order_in_parallel=True),
    "CogVideoXTransformer3DModel": _Adapter(lambda t: [block.attn1 for block in t.transformer_blocks],
                                            _cogvideox_grid, 2, _replace_processor, _cogvideox_keep_order),
    "HunyuanVideoTransformer3DModel": _Adapter(_hunyuan_attentions, _hunyuan_grid, 1, _route_through_dispatch),
}


def _adapter(transformer) -> _Adapter:
    for cls in type(transformer).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    if hasattr(transformer, "transformer") and hasattr(transformer, "components"):
        raise ValueError(f"apply() takes the pipeline's transformer, not the pipeline: pass pipe.transformer "
                         f"(got a {type(transformer).__name__})")
    raise ValueError(f"psa.integrations.diffusers supports {sorted(_ADAPTERS)}, got {type(transformer).__name__}")


def _before_forward(state: _State):
    def hook(module, args, kwargs):
        hidden = forward_hidden_states(args, kwargs)
        state.grid_shape = hidden.new_empty((*state.adapter.grid(module, hidden), 0))
        state.begin_forward(hidden.device)
        if state.warmup_steps > 0 or state.shares_steps:
            state.observe(forward_timestep(state.adapter, args, kwargs))
    return hook


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------

def apply(transformer, config: Union[None, PSAConfig, Mapping[int, PSAConfig]] = None, *, warmup_steps: int = 0,
          order: str = "gilbert", tile: Sequence[int] = _layout.DEFAULT_TILE, layers: Optional[Iterable[int]] = None,
          collect_stats: bool = True, share_steps_with=None, keep_order: bool = True):
    """Route `transformer`'s video self-attention through psa. Returns the transformer.

    `config`: one PSAConfig for every patched block, or `{block index: PSAConfig}` (as
    `psa.tools.calibrate(..., per_layer=True)` returns): blocks without an entry stay dense.
    `warmup_steps`: the first denoising steps run dense. `order`: token order for the blocks ("gilbert",
    "tiled" or "raster"). `layers`: block indices to patch (default all, or the mapping's keys).
    `collect_stats`: keep per-layer, per-step level counts on the device for `stats()`.
    `share_steps_with`: another transformer psa is applied to whose denoising steps this one continues:
    Wan2.2's second expert (`apply(pipe.transformer_2, ..., share_steps_with=pipe.transformer)`), so
    that warm-up counts the pipeline's steps, not each expert's.
    `keep_order`: hold the blocks' video tokens in `order` from the first block to the last (Wan, also
    under context parallelism, and CogVideoX) instead of permuting q, k, v and the output in every psa
    layer; the result is the same. HunyuanVideo permutes per layer. Warm-up steps run in the model's
    own order: pass False when something caches block or attention outputs across steps (diffusers'
    cache hooks), so that no cached tensor changes order between steps.
    """
    config = PSAConfig() if config is None else config
    per_layer = dict(config) if isinstance(config, Mapping) else None
    if per_layer is not None:
        bad_keys = [key for key in per_layer if isinstance(key, bool) or not isinstance(key, int)]
        if bad_keys:
            raise ValueError(f"a per-layer config maps block indices (ints) to PSAConfig, got keys {bad_keys[:5]!r}"
                             " (read a saved JSON mapping with psa.tools.calibrate.configs_from_json)")
    for value in (per_layer.values() if per_layer is not None else [config]):
        if not isinstance(value, PSAConfig):
            raise ValueError(f"config must be a psa.PSAConfig or a mapping of block index to PSAConfig, "
                             f"got {type(value).__name__}")
    if per_layer is not None:
        if layers is not None:
            raise ValueError("give layers or a per-layer config mapping, not both")
        layers = per_layer
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if order not in _layout.ORDERS:
        raise ValueError(f"order must be one of {_layout.ORDERS}, got {order!r}")
    _layout.check_tile(tile)
    adapter = _adapter(transformer)
    if getattr(transformer, _ATTRIBUTE, None) is not None:
        raise ValueError("psa is already applied to this transformer; call remove() first")
    attentions = adapter.attentions(transformer)
    chosen = range(len(attentions)) if layers is None else sorted(set(layers))
    if any(not 0 <= i < len(attentions) for i in chosen):
        raise ValueError(f"layers must be block indices in [0, {len(attentions)}), got {list(chosen)}")

    shared = None
    if share_steps_with is not None:
        shared = getattr(share_steps_with, _ATTRIBUTE, None)
        if shared is None or share_steps_with is transformer:
            raise ValueError("share_steps_with must be another transformer psa is already applied to, e.g. "
                             "pipe.transformer when applying to pipe.transformer_2")
    configs = {i: per_layer[i] if per_layer is not None else config for i in chosen}
    state = _State(configs, order, tuple(tile), warmup_steps, collect_stats, adapter, tuple(chosen))
    parameter = next(transformer.parameters(), None)
    state.allocate_counts(parameter.device if parameter is not None else torch.device("cpu"))
    if shared is not None:
        state.steps = shared.steps
        state.shares_steps = shared.shares_steps = True
    if not isinstance(keep_order, bool):
        raise ValueError(f"keep_order must be a bool, got {keep_order!r}")
    for i in chosen:
        adapter.install(state, attentions[i], configs[i])
    state.hook = transformer.register_forward_pre_hook(_before_forward(state), with_kwargs=True)
    # After psa's own pre-hook, whose grid and step the keep_order hooks read. Under context parallelism
    # diffusers splits the blocks' input across ranks by its own hooks: only Wan's hooks know where.
    if (keep_order and adapter.keep_order is not None and len(attentions) > 0
            and (adapter.keep_order_in_parallel
                 or _context_parallel_config(getattr(transformer, "_parallel_config", None)) is None)):
        adapter.keep_order(state, transformer)
    setattr(transformer, _ATTRIBUTE, state)
    return transformer


def remove(transformer):
    """Undo `apply`: the original processors (and their attention backends) come back, the hook goes."""
    state = getattr(transformer, _ATTRIBUTE, None)
    if state is None:
        return transformer
    for restore in reversed(state.restore):
        restore()
    state.hook.remove()
    delattr(transformer, _ATTRIBUTE)
    return transformer


def stats(transformer) -> List[dict]:
    """Per (step, layer) of the current generation: density, coverage and level histogram. Reads the
    counts kept on the device (one synchronisation, here). Steps are told apart when `warmup_steps > 0`
    (the timestep is read then); otherwise all calls so far count as step 0."""
    state = getattr(transformer, _ATTRIBUTE, None)
    if state is None:
        raise ValueError("psa is not applied to this transformer")
    snapshots = list(state.history)
    if state.counts is not None:
        snapshots.append((state.step, state.counts))
    report = []
    for step, table in snapshots:
        for row, layer in zip(table.cpu(), state.layers):
            summary = counts_summary(row.tolist())
            if summary is None:
                continue   # this layer did not run psa at this step (warm-up)
            report.append(dict(step=step, layer=layer, **summary))
    if not report and state.collect_stats:
        warnings.warn("psa.integrations.diffusers.stats: psa has not run on this transformer yet (no forward "
                      "since apply(), or every step so far was a dense warm-up step)", stacklevel=2)
    return report
