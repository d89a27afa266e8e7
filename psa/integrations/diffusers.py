"""One call puts psa into a diffusers video transformer:

    import psa.integrations.diffusers as psa_diffusers
    psa_diffusers.apply(pipe.transformer, psa.PSAConfig(), warmup_steps=12)
    video = pipe(prompt).frames
    print(psa_diffusers.stats(pipe.transformer))   # density / coverage per layer and step
    psa_diffusers.remove(pipe.transformer)

Supported: `WanTransformer3DModel` (Wan2.1, Wan2.2; for the two-expert A14B pipeline apply to
`pipe.transformer` and `pipe.transformer_2`). Video self-attention (`attn1` of each block) runs through
`psa.sparse_attention`; cross-attention to text (and Wan I2V's image context) stays dense.

How it hooks in, without copying the model's attention code: each patched attention processor gets a
route object as its `_attention_backend`, and the transformer module's `dispatch_attention_fn` is wrapped
once so that a call carrying a route goes to psa and every other call (other models, cross-attention,
warm-up steps) goes to diffusers' own dispatcher unchanged. The latent grid comes from the transformer's
input shape and patch size; q, k, v are permuted into `order` (psa.layout) and the output back.

Dense warm-up counts denoising steps from the transformer's forward calls and their timestep: a
smaller timestep than the previous call is the next step, an equal one is the same step (classifier-free
guidance run as a second pass), a larger one starts a new generation. Reading the timestep is one host
read per transformer forward, done only when `warmup_steps > 0`.
"""

from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .. import layout as _layout
from ..config import PSAConfig
from ..ops import sparse_attention

LEVELS = (0, 1, 2, 4, 8)
_ATTRIBUTE = "_psa_state"


@dataclass(eq=False)  # hashed by identity: kept in a WeakSet
class _State:
    """Everything psa keeps for one patched transformer."""

    config: PSAConfig
    order: str
    tile: Sequence[int]
    warmup_steps: int
    collect_stats: bool
    patch_size: Sequence[int]
    grid: Optional[Sequence[int]] = None
    step: int = 0
    last_timestep: Optional[float] = None
    records: List[tuple] = field(default_factory=list)       # (step, layer, level counts on device)
    saved_backends: Dict[object, object] = field(default_factory=dict)
    hook: object = None

    def observe(self, timestep: torch.Tensor) -> None:
        value = float(timestep.detach().max())
        if self.last_timestep is None or value > self.last_timestep:
            self.step = 0
            self.records.clear()
        elif value < self.last_timestep:
            self.step += 1
        self.last_timestep = value

    @property
    def dense_now(self) -> bool:
        return self.step < self.warmup_steps


class _Route:
    """Installed as an attention processor's `_attention_backend`: marks its calls as psa's."""

    def __init__(self, state: _State, layer: int):
        self.state, self.layer = state, layer

    def handles(self, query: torch.Tensor, key: torch.Tensor) -> bool:
        grid = self.state.grid
        if grid is None or self.state.dense_now:
            return False
        tokens = grid[0] * grid[1] * grid[2]
        return query.shape[1] == tokens and key.shape[1] == tokens

    def attend(self, query, key, value, scale):
        """query/key/value `[B, L, H, D]` as diffusers holds them; returns the same layout."""
        state = self.state
        order = _layout.get_layout(state.grid, state.order, tile=state.tile, device=query.device)
        q, k, v = (order.permute(x, dim=1).transpose(1, 2) for x in (query, key, value))
        out, levels = sparse_attention(q, k, v, state.config, scale=scale, return_levels=True)
        if state.collect_stats:
            counts = torch.stack([(levels == level).sum() for level in LEVELS])
            state.records.append((state.step, self.layer, counts))
        return order.unpermute(out.transpose(1, 2), dim=1)


# --------------------------------------------------------------------------------------------------
# The dispatcher wrapper, installed once per diffusers module that defines a supported processor
# --------------------------------------------------------------------------------------------------

# Per diffusers module: the states of the models patched through it. The wrapper is removed when the
# last of them is removed (a model dropped without remove() leaves a wrapper that only forwards).
_live_states: Dict[str, weakref.WeakSet] = {}


def _install_dispatch(module_name: str) -> None:
    module = sys.modules[module_name]
    original = module.dispatch_attention_fn
    if getattr(original, "_psa_original", None) is not None:
        return

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        if isinstance(backend, _Route):
            if attn_mask is None and not is_causal and dropout_p == 0.0 and backend.handles(query, key):
                return backend.attend(query, key, value, scale)
            backend = backend.state.saved_backends.get(backend)
        return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                        scale=scale, enable_gqa=enable_gqa, attention_kwargs=attention_kwargs, backend=backend,
                        parallel_config=parallel_config)

    dispatch_attention_fn._psa_original = original
    module.dispatch_attention_fn = dispatch_attention_fn


def _uninstall_dispatch(module_name: str) -> None:
    module = sys.modules[module_name]
    original = getattr(module.dispatch_attention_fn, "_psa_original", None)
    if original is not None:
        module.dispatch_attention_fn = original


# --------------------------------------------------------------------------------------------------
# Model adapters: which attention modules are video self-attention, and the transformer's patch size
# --------------------------------------------------------------------------------------------------

def _wan_self_attention(transformer) -> List:
    return [block.attn1 for block in transformer.blocks]


_ADAPTERS = {"WanTransformer3DModel": _wan_self_attention}


def _adapter(transformer):
    for cls in type(transformer).__mro__:
        if cls.__name__ in _ADAPTERS:
            return _ADAPTERS[cls.__name__]
    raise ValueError(f"psa.integrations.diffusers supports {sorted(_ADAPTERS)}, got {type(transformer).__name__}")


def _before_forward(state: _State):
    def hook(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        frames, height, width = hidden.shape[-3:]
        p_t, p_h, p_w = state.patch_size
        state.grid = (frames // p_t, height // p_h, width // p_w)
        if state.warmup_steps > 0:
            state.observe(kwargs["timestep"] if "timestep" in kwargs else args[1])
    return hook


def apply(transformer, config: Optional[PSAConfig] = None, *, warmup_steps: int = 0, order: str = "gilbert",
          tile: Sequence[int] = _layout.DEFAULT_TILE, layers: Optional[Iterable[int]] = None,
          collect_stats: bool = True):
    """Route `transformer`'s video self-attention through psa. Returns the transformer.

    `warmup_steps`: the first denoising steps run dense. `order`: token order for the blocks ("gilbert",
    "tiled" or "raster"). `layers`: block indices to patch (default all). `collect_stats`: keep per-layer,
    per-step level counts on the device for `stats()`.
    """
    config = PSAConfig() if config is None else config
    if not isinstance(config, PSAConfig):
        raise ValueError(f"config must be a psa.PSAConfig, got {type(config).__name__}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative int, got {warmup_steps!r}")
    if order not in _layout.ORDERS:
        raise ValueError(f"order must be one of {_layout.ORDERS}, got {order!r}")
    if getattr(transformer, _ATTRIBUTE, None) is not None:
        raise ValueError("psa is already applied to this transformer; call remove() first")
    attentions = _adapter(transformer)(transformer)
    chosen = range(len(attentions)) if layers is None else sorted(set(layers))
    if any(not 0 <= i < len(attentions) for i in chosen):
        raise ValueError(f"layers must be block indices in [0, {len(attentions)}), got {list(chosen)}")

    state = _State(config, order, tuple(tile), warmup_steps, collect_stats, tuple(transformer.config.patch_size))
    for i in chosen:
        processor = attentions[i].processor
        route = _Route(state, i)
        state.saved_backends[route] = processor._attention_backend
        processor._attention_backend = route
        _install_dispatch(type(processor).__module__)
        _live_states.setdefault(type(processor).__module__, weakref.WeakSet()).add(state)
    state.hook = transformer.register_forward_pre_hook(_before_forward(state), with_kwargs=True)
    setattr(transformer, _ATTRIBUTE, state)
    return transformer


def remove(transformer):
    """Undo `apply`: processors get their own attention backends back and the hook goes."""
    state = getattr(transformer, _ATTRIBUTE, None)
    if state is None:
        return transformer
    attentions = _adapter(transformer)(transformer)
    for attention in attentions:
        processor = attention.processor
        if isinstance(processor._attention_backend, _Route):
            processor._attention_backend = state.saved_backends[processor._attention_backend]
            module = type(processor).__module__
            _live_states.get(module, weakref.WeakSet()).discard(state)
            if not _live_states.get(module):
                _uninstall_dispatch(module)
    state.hook.remove()
    delattr(transformer, _ATTRIBUTE)
    return transformer


def stats(transformer) -> List[dict]:
    """Per (step, layer) of the current generation: density, coverage and level histogram. Reads the
    counts kept on the device (one synchronisation, here)."""
    state = getattr(transformer, _ATTRIBUTE, None)
    if state is None:
        raise ValueError("psa is not applied to this transformer")
    rows: Dict[tuple, torch.Tensor] = {}
    for step, layer, counts in state.records:
        key = (step, layer)
        rows[key] = rows[key] + counts.cpu() if key in rows else counts.cpu()
    report = []
    for (step, layer), counts in sorted(rows.items()):
        total = counts.sum().item()
        fractions = {level: counts[i].item() / total for i, level in enumerate(LEVELS)}
        density = sum(fraction / level for level, fraction in fractions.items() if level)
        report.append(dict(step=step, layer=layer, density=density, coverage=1.0 - fractions[0],
                           histogram=fractions))
    return report
