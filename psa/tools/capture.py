"""Record q, k, v of a model's attention calls.

    with psa.tools.capture(pipe.transformer, layers=[0, 10, 20], steps=[5, 25]) as captures:
        pipe(prompt)
    psa.tools.save(captures, "wan_qkv.safetensors")

Every call of `F.scaled_dot_product_attention` made while `module` runs forward is seen through a
`TorchFunctionMode` (diffusers' default attention backend ends in it, and so do most models), so no
model code is patched.

- A diffusers transformer psa supports is numbered as `psa.integrations.diffusers.apply` numbers it:
  the layer is the index of the block whose video self-attention made the call (attention elsewhere,
  such as HunyuanVideo's text refiner, is not recorded), and the step is the denoising step read from
  the forward's timestep (a second classifier-free-guidance pass at the same timestep is the same
  step). It also gives the latent grid.
- Any other module: within a forward, self-attention calls (`Lq == Lk`) are numbered 0, 1, 2, ...
  (the layer), and each forward is a step; pass `grid=` for the token order.

Records stop once `max_bytes` are held (a warning says so; `.skipped` counts the calls dropped).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@dataclass
class Capture:
    """One recorded attention call: `q [B, Hq, L, D]`, `k, v [B, Hkv, L, D]` on the CPU."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    layer: int
    step: int
    grid: Optional[Sequence[int]] = None     # latent (T, H, W) of the video tokens, if known
    text_before: int = 0                     # text tokens before / after the video tokens
    text_after: int = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v))


class Captures(list):
    """The recorded `Capture`s, plus `skipped`: selected calls the size cap dropped."""

    skipped: int = 0


class _Recorder(TorchFunctionMode):
    def __init__(self, session: "_Session"):
        super().__init__()
        self.session = session

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            # q, k, v may come by position or by name (diffusers passes them by name).
            named = dict(zip(("query", "key", "value"), args))
            named.update({name: kwargs[name] for name in ("query", "key", "value") if name in kwargs})
            self.session.observe(named["query"], named["key"], named["value"])
        return func(*args, **kwargs)


class _Session:
    def __init__(self, module, layers, steps, max_bytes, grid):
        self.module, self.max_bytes, self.grid = module, max_bytes, grid
        self.layers = None if layers is None else set(layers)
        self.steps = None if steps is None else set(steps)
        self.captures = Captures()
        self.held = 0
        self.step = -1
        self.layer = 0
        self.block = None            # diffusers: index of the patched block running now, else None
        self.current_grid = None
        self.in_forward = False      # attention calls outside `module`'s forward are not recorded
        self.adapter = _diffusers_adapter(module)
        self.step_counter = None
        if self.adapter is not None:
            from ..integrations.diffusers import StepCounter
            self.step_counter = StepCounter()

    def hooks(self):
        """Forward hooks: the module's own, and on a diffusers transformer one pair per patched block."""
        handles = [self.module.register_forward_pre_hook(self.begin_forward, with_kwargs=True),
                   self.module.register_forward_hook(self.end_forward)]
        if self.adapter is not None:
            for index, attention in enumerate(self.adapter.attentions(self.module)):
                handles.append(attention.register_forward_pre_hook(
                    lambda module, args, index=index: setattr(self, "block", index)))
                handles.append(attention.register_forward_hook(
                    lambda module, args, output: setattr(self, "block", None)))
        return handles

    def begin_forward(self, module, args, kwargs):
        self.in_forward = True
        self.layer = 0
        if self.adapter is not None:
            from ..integrations.diffusers import forward_timestep
            self.step_counter.advance(forward_timestep(self.adapter, args, kwargs))
            self.step = self.step_counter.step
        else:
            self.step += 1
        if self.grid is not None:
            self.current_grid = tuple(self.grid)
        elif self.adapter is not None:
            from ..integrations.diffusers import forward_hidden_states
            self.current_grid = self.adapter.grid(module, forward_hidden_states(args, kwargs))
        else:
            self.current_grid = None

    def end_forward(self, module, args, output):
        self.in_forward = False

    def observe(self, q, k, v):
        if not self.in_forward or q.shape[-2] != k.shape[-2]:
            return                                   # cross-attention: not a layer of ours
        if self.adapter is not None:
            if self.block is None:
                return                               # not a patched block's attention (e.g. a text refiner)
            layer = self.block
        else:
            layer, self.layer = self.layer, self.layer + 1
        if (self.layers is not None and layer not in self.layers) or (self.steps is not None and
                                                                      self.step not in self.steps):
            return
        size = sum(t.numel() * t.element_size() for t in (q, k, v))
        if self.held + size > self.max_bytes:
            if self.captures.skipped == 0:
                warnings.warn(f"psa.tools.capture: max_bytes={self.max_bytes} reached; later calls are not "
                              "recorded (captures.skipped counts them)", stacklevel=2)
            self.captures.skipped += 1
            return
        grid, text_before, text_after = self.current_grid, 0, 0
        if grid is not None:
            extra = q.shape[-2] - grid[0] * grid[1] * grid[2]
            text_before, text_after = _text_placement(self.module, extra)
        self.captures.append(Capture(*(t.detach().to("cpu", copy=True) for t in (q, k, v)), layer=layer,
                                     step=self.step, grid=grid, text_before=text_before, text_after=text_after))
        self.held += size


def _diffusers_adapter(module):
    """The integration's adapter of a diffusers transformer psa supports, else None."""
    try:
        from ..integrations.diffusers import _adapter
        return _adapter(module)
    except (ImportError, ValueError):
        return None


def _text_placement(module, extra_tokens: int):
    """Where the `extra_tokens` non-video tokens of a joint sequence sit: CogVideoX puts text first,
    HunyuanVideo last."""
    if extra_tokens <= 0:
        return 0, 0
    return (extra_tokens, 0) if type(module).__name__.startswith("CogVideoX") else (0, extra_tokens)


@contextlib.contextmanager
def capture(module: torch.nn.Module, *, layers: Optional[Iterable[int]] = None, steps: Optional[Iterable[int]] = None,
            max_bytes: int = 1 << 30, grid: Optional[Sequence[int]] = None) -> Iterator[Captures]:
    """Record the self-attention inputs of `module`'s forwards inside the `with` block.

    `layers`, `steps`: which calls to keep (default all); `max_bytes`: a cap on what is held (calls
    beyond it are not kept, only counted in the list's `.skipped`); `grid`: the latent grid when
    `module` is not a diffusers transformer psa knows.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    session = _Session(module, layers, steps, max_bytes, grid)
    hooks = session.hooks()
    recorder = _Recorder(session)
    try:
        with recorder:
            yield session.captures
    finally:
        for hook in hooks:
            hook.remove()


def save(captures: List[Capture], path: str) -> None:
    """Write captures to a safetensors file (tensors plus their layer, step and grid as metadata)."""
    from safetensors.torch import save_file
    tensors, meta = {}, []
    for i, c in enumerate(captures):
        tensors.update({f"{i}.q": c.q.contiguous(), f"{i}.k": c.k.contiguous(), f"{i}.v": c.v.contiguous()})
        meta.append(dict(layer=c.layer, step=c.step, grid=None if c.grid is None else list(c.grid),
                         text_before=c.text_before, text_after=c.text_after))
    save_file(tensors, path, metadata={"psa_captures": json.dumps(meta)})


def load(path: str) -> List[Capture]:
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["psa_captures"])
        return [Capture(f.get_tensor(f"{i}.q"), f.get_tensor(f"{i}.k"), f.get_tensor(f"{i}.v"), **m)
                for i, m in enumerate(meta)]
