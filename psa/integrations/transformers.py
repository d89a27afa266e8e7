"""One call puts psa into the causal prefill of a transformers vision-language model:

    import psa.integrations.transformers as psa_transformers
    psa_transformers.apply(model)            # Qwen2.5-VL / Qwen2-VL ...ForConditionalGeneration or ...Model
    out = model.generate(**inputs)           # the prefill's self-attention runs psa, decoding does not
    print(psa_transformers.stats(model))     # density / coverage per layer of the last prefill
    psa_transformers.remove(model)

What runs psa: the language model's self-attention during prefill (the query covers the whole key
sequence, no KV cache entries before it) of at least `min_tokens` tokens of an unpadded batch (the
pre-hook reads the `attention_mask`, once per prefill, when one is given). psa
attends causally (bottom-right, docs/spec.md section 3) with grouped-query heads as they are; the
text tokens (every token that is not an image or video placeholder: the system prompt, the question)
are forced keys and forced query rows, so every row sees all text at full resolution and text rows
are dense; the first key block (the attention sink) stays at level 1. Decode steps, short prompts,
padded batches and the vision encoder run the model's own attention implementation, whichever the
user chose (`attn_implementation="sdpa"`, flash, eager).

How it hooks in: psa registers one attention function ("psa") with transformers' AttentionInterface,
and each patched attention module gets a shallow copy of its config whose `_attn_implementation` names
it, so only those modules look it up; masks are still built for the user's implementation. A forward
pre-hook on the model reads `input_ids` once per forward to mark the text tokens. `remove` puts the
modules' own configs back. `torch.compile(model, fullgraph=True)` traces a patched prefill whole.
"""

from __future__ import annotations

import copy
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from ..config import PSAConfig
from ..ops import sparse_attention
from ..reference import LEVEL_VALUES, candidate_blocks
from ..stats import counts_summary

_ATTRIBUTE = "_psa_state"
_IMPLEMENTATION = "psa"
# The default for video-understanding prefill (the paper's setting): causal, antidiagonal estimation.
DEFAULT_CONFIG = PSAConfig(causal=True, estimator="antidiagonal")


@dataclass
class _State:
    config: PSAConfig
    min_tokens: int
    layers: List[int]                                   # patched decoder layers (layer_idx)
    vision_tokens: tuple                                # token ids of image / video placeholders
    text: Optional[torch.Tensor] = None                 # [B, L] bool: this forward's text tokens
    unpadded: bool = True                               # this forward's batch has no padding
    counts: Dict[int, torch.Tensor] = field(default_factory=dict)   # layer -> [5] level counts (device)
    restore: list = field(default_factory=list)


def _attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """The registered "psa" attention function: psa for a prefill it can take, else the module's own
    implementation. transformers passes `[B, H, L, D]` query and `[B, H_kv, L, D]` key / value."""
    state: _State = module._psa_state
    fallback = module._psa_fallback
    q_len, k_len = query.shape[2], key.shape[2]
    # A mask here is the causal mask itself when the batch has no padding (the eager implementation
    # always builds one); psa applies causality on its own.
    if ((attention_mask is None or state.unpadded) and dropout == 0.0 and q_len == k_len
            and q_len >= state.min_tokens and kwargs.get("sliding_window") is None
            and not kwargs.get("output_attentions", False)):
        text = state.text if state.text is not None and state.text.shape[-1] == q_len else None
        out, _, levels = sparse_attention(query, key, value, state.config, scale=scaling, force_keys=text,
                                          force_queries=text, return_lse=True, return_levels=True)
        _record(state, module.layer_idx, levels, q_len, k_len)
        return out.transpose(1, 2).contiguous(), None
    return fallback(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _record(state: _State, layer: int, levels: torch.Tensor, q_len: int, k_len: int) -> None:
    """Level counts over the causal candidate pairs of this prefill, kept on the device."""
    config = state.config
    candidates = candidate_blocks(q_len, k_len, config.block_m, config.block_n, config.causal, levels.device)
    state.counts[layer] = torch.stack([((levels == level) & candidates).sum() for level in LEVEL_VALUES])


def _language_attentions(model):
    """The language model's self-attention modules (decoder layers' `self_attn`)."""
    language = getattr(model, "language_model", None) or getattr(getattr(model, "model", None), "language_model",
                                                                  None)
    if language is None or not hasattr(language, "layers"):
        raise ValueError("psa.integrations.transformers supports vision-language models with a language_model of "
                         f"decoder layers (Qwen2.5-VL, Qwen2-VL), got {type(model).__name__}")
    return [layer.self_attn for layer in language.layers]


def _vision_token_ids(model) -> tuple:
    config = model.config
    ids = [getattr(config, name, None) for name in ("image_token_id", "video_token_id")]
    return tuple(i for i in ids if i is not None)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_IMPLEMENTATION, _attention)


def _before_forward(state: _State):
    def hook(module, args, kwargs):
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        # One host read per prefill (never per decode step): whether the batch is padded.
        state.unpadded = (mask is None or not isinstance(input_ids, torch.Tensor)
                          or (input_ids.shape[-1] >= state.min_tokens and bool(mask.all())))
        if not isinstance(input_ids, torch.Tensor):
            state.text = None
            return
        vision = torch.zeros_like(input_ids, dtype=torch.bool)
        for token in state.vision_tokens:
            vision |= input_ids == token
        state.text = ~vision
    return hook


def apply(model, config: Optional[PSAConfig] = None, *, min_tokens: int = 4096, layers=None):
    """Run `model`'s prefill self-attention through psa. Returns the model.

    `config`: a causal PSAConfig (default `DEFAULT_CONFIG`: antidiagonal estimator, default bounds).
    `min_tokens`: shorter prefills run the model's own attention. `layers`: decoder layer indices to
    patch (default all)."""
    config = DEFAULT_CONFIG if config is None else config
    if not isinstance(config, PSAConfig):
        raise ValueError(f"config must be a psa.PSAConfig, got {type(config).__name__}")
    if not config.causal:
        raise ValueError("a language model's prefill is causal: pass a PSAConfig with causal=True")
    if isinstance(min_tokens, bool) or not isinstance(min_tokens, int) or min_tokens < 1:
        raise ValueError(f"min_tokens must be a positive int, got {min_tokens!r}")
    if getattr(model, _ATTRIBUTE, None) is not None:
        raise ValueError("psa is already applied to this model; call remove() first")
    attentions = _language_attentions(model)
    chosen = list(range(len(attentions))) if layers is None else sorted(set(layers))
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(attentions) for i in chosen):
        raise ValueError(f"layers must be decoder layer indices in [0, {len(attentions)}), got {layers!r}")
    _register()
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    state = _State(config, min_tokens, chosen, _vision_token_ids(model))
    for i in chosen:
        module = attentions[i]
        original = module.config
        implementation = original._attn_implementation or "eager"
        if implementation == _IMPLEMENTATION:
            raise ValueError("this attention module already runs psa")
        if implementation == "eager":   # the model's own eager function, in its modeling module
            fallback = sys.modules[type(module).__module__].eager_attention_forward
        else:
            fallback = ALL_ATTENTION_FUNCTIONS[implementation]
        patched = copy.copy(original)
        patched._attn_implementation = _IMPLEMENTATION
        module.config, module._psa_state, module._psa_fallback = patched, state, fallback

        def restore(module=module, original=original):
            module.config = original
            del module._psa_state, module._psa_fallback

        state.restore.append(restore)
    handle = model.register_forward_pre_hook(_before_forward(state), with_kwargs=True)
    state.restore.append(handle.remove)
    setattr(model, _ATTRIBUTE, state)
    return model


def remove(model):
    """Undo `apply`: the attention modules' own configs come back, the hook goes."""
    state = getattr(model, _ATTRIBUTE, None)
    if state is None:
        raise ValueError("psa is not applied to this model")
    for restore in reversed(state.restore):
        restore()
    delattr(model, _ATTRIBUTE)
    return model


def stats(model) -> List[dict]:
    """Per patched layer that ran psa in the last prefill: density, coverage and level histogram over
    the causal candidate pairs (one synchronisation, here)."""
    state = getattr(model, _ATTRIBUTE, None)
    if state is None:
        raise ValueError("psa is not applied to this model")
    report = []
    for layer in state.layers:
        if layer not in state.counts:
            continue
        summary = counts_summary(state.counts[layer].tolist())
        if summary is not None:
            report.append(dict(layer=layer, **summary))
    if not report:
        warnings.warn("psa.integrations.transformers.stats: no prefill has run psa yet (none since apply(), or "
                      "every one was shorter than min_tokens or padded)", stacklevel=2)
    return report
