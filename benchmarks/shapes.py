"""Attention shapes of the video models psa targets: (heads, tokens, head_dim) and the latent grid."""

from dataclasses import dataclass
from typing import Tuple


@dataclass(frozen=True)
class Shape:
    name: str
    heads: int
    head_dim: int
    grid: Tuple[int, int, int]   # latent (T, H, W) after patching
    text_tokens: int = 0

    @property
    def tokens(self) -> int:
        t, h, w = self.grid
        return t * h * w + self.text_tokens


SHAPES = {
    # Wan2.1-1.3B, 832x480, 81 frames: 21 x 30 x 52 latent patches.
    "wan1.3b_480p": Shape("wan1.3b_480p", heads=12, head_dim=128, grid=(21, 30, 52)),
    # CogVideoX-5B, 720x480, 49 frames, plus 226 text tokens in joint attention.
    "cogvideox5b": Shape("cogvideox5b", heads=48, head_dim=64, grid=(13, 30, 45), text_tokens=226),
    # Wan2.1-14B, 1280x720, 81 frames: 21 x 45 x 80.
    "wan14b_720p": Shape("wan14b_720p", heads=40, head_dim=128, grid=(21, 45, 80)),
    # A small video for CPU runs: 4 x 24 x 40 = 3840 tokens.
    "cpu_small": Shape("cpu_small", heads=2, head_dim=64, grid=(4, 24, 40)),
}
