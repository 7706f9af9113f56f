"""The three ways of knowing: per-token relevance scorers for one image.

Each scorer returns one score per merged vision token (``[N]``, ``N = gh*gw``, raster order).
The scores are unnormalised; :class:`arr_coc.balancing.TensionBalancer` standardises them per
image before mixing, so only their *ranking and spacing within an image* matters. That is also
why the final layers have no bias: a constant offset would vanish in the standardisation.

* :class:`InformationScorer` (propositional: *how much is there*): the Shannon entropy of the
  pixels inside each cell, from histograms of luminance and two colour-opponent channels,
  mixed by a tiny learnable head.
* :class:`PerspectivalScorer` (perspectival: *what stands out*): a small CNN over the 13-channel
  texture array (:mod:`arr_coc.texture`), so each token sees its neighbourhood.
* :class:`ParticipatoryScorer` (participatory: *what matters for this question*): couples the
  frozen vision tokens with the question embedding in a small shared space.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arr_coc.texture import NUM_CHANNELS, opponent, working_image

ENTROPY_BINS = 16


def cell_histograms(values: Tensor, grid_hw: tuple[int, int], bins: int = ENTROPY_BINS) -> Tensor:
    """Per-cell histograms of ``[C, gh*ch, gw*cw]`` values in [0, 1] → probabilities ``[C, N, bins]``.

    Hard bins, counted with one ``scatter_add`` over all pixels (no per-cell loop). Hard rather
    than soft binning, because a kernel spreading a flat cell over two neighbouring bins would
    give it an entropy that depends on its grey level; here a flat cell has entropy exactly 0.
    """
    channels, height, width = values.shape
    gh, gw = grid_hw
    ch, cw = height // gh, width // gw
    rows = torch.arange(height, device=values.device) // ch
    cols = torch.arange(width, device=values.device) // cw
    cell = (rows[:, None] * gw + cols[None, :]).flatten()  # [H*W]
    bucket = (values.flatten(1) * bins).long().clamp(0, bins - 1)  # [C, H*W]
    counts = torch.zeros(channels, gh * gw * bins, device=values.device, dtype=values.dtype)
    counts.scatter_add_(1, cell[None] * bins + bucket, torch.ones_like(bucket, dtype=values.dtype))
    return counts.view(channels, gh * gw, bins) / (ch * cw)


@torch.no_grad()
def cell_entropies(image: Tensor, grid_hw: tuple[int, int], bins: int = ENTROPY_BINS) -> Tensor:
    """Normalised Shannon entropy (in [0, 1]) of luminance, red-green and blue-yellow in each cell → ``[3, N]``."""
    rgb = working_image(image, grid_hw)
    channels = opponent(rgb)
    channels[1:] = (channels[1:] + 1.0) * 0.5  # opponent channels from [-1, 1] to [0, 1]
    probs = cell_histograms(channels, grid_hw, bins)  # [3, N, bins]
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
    return entropy / math.log(bins)


class InformationScorer(nn.Module):
    """Entropy of the pixels in each cell, mixed by a learnable head.

    The prior is the plain sum of the three channel entropies (positive mixing weights start
    at 1); a small MLP adds a learned non-linear correction (e.g. "uniform noise is not
    interesting") that starts near zero.
    """

    def __init__(self, hidden: int = 8):
        super().__init__()
        self.raw_weights = nn.Parameter(torch.full((3,), math.log(math.e - 1.0)))  # softplus → 1
        self.correction = nn.Sequential(nn.Linear(3, hidden), nn.GELU(), nn.Linear(hidden, 1, bias=False))
        nn.init.normal_(self.correction[2].weight, std=0.01)

    def forward(self, image: Tensor, grid_hw: tuple[int, int]) -> Tensor:
        """``image`` ``[3, H, W]`` in [0, 1] → ``[N]`` information scores."""
        dtype = self.raw_weights.dtype
        entropy = cell_entropies(image, grid_hw).to(dtype).T  # [N, 3]
        return entropy @ F.softplus(self.raw_weights) + self.correction(entropy).squeeze(-1)


class PerspectivalScorer(nn.Module):
    """A small CNN over the texture array: salience of each token in its spatial context.

    Two 3x3 convolutions (the second dilated, so the receptive field spans 7x7 tokens) and a
    1x1 read-out. Zero padding, so the position channels plus the border make the CNN aware of
    the image frame.
    """

    def __init__(self, hidden: int = 32, in_channels: int = NUM_CHANNELS):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(hidden, hidden, 3, padding=2, dilation=2),
            nn.GELU(),
            nn.Conv2d(hidden, 1, 1, bias=False),
        )

    def forward(self, texture: Tensor) -> Tensor:
        """``texture`` ``[13, gh, gw]`` → ``[N]`` perspectival scores."""
        weight = self.net[0].weight
        return self.net(texture.to(weight.dtype)[None]).flatten()


class ParticipatoryScorer(nn.Module):
    """Query–content coupling: how much each vision token answers to the question.

    Both the frozen vision tokens ``[N, Dv]`` and the question embedding ``[Dq]`` are
    layer-normalised (their scales differ wildly between models) and projected to a small
    shared space of ``coupling_dim``. The score is a scaled bilinear match ``<v, q>/sqrt(r)``
    plus a small MLP over ``[v * q, v]`` (the query-gated content and the content itself), so it
    can learn couplings beyond one direction. The two projections dominate the parameter count
    (``(Dv + Dq) * coupling_dim``), which is why the coupling space is kept narrow.
    """

    def __init__(self, vision_dim: int, query_dim: int, coupling_dim: int = 16, hidden: int = 32):
        super().__init__()
        self.coupling_dim = coupling_dim
        self.vision_norm = nn.LayerNorm(vision_dim, elementwise_affine=False)
        self.query_norm = nn.LayerNorm(query_dim, elementwise_affine=False)
        self.vision_proj = nn.Linear(vision_dim, coupling_dim, bias=False)
        self.query_proj = nn.Linear(query_dim, coupling_dim)
        self.mlp = nn.Sequential(
            nn.Linear(2 * coupling_dim, hidden), nn.GELU(), nn.Linear(hidden, 1, bias=False)
        )

    def forward(self, vision_tokens: Tensor, query: Tensor) -> Tensor:
        """``vision_tokens`` ``[N, Dv]``, ``query`` ``[Dq]`` → ``[N]`` participatory scores."""
        dtype = self.vision_proj.weight.dtype
        content = self.vision_proj(self.vision_norm(vision_tokens.to(dtype)))  # [N, r]
        question = self.query_proj(self.query_norm(query.to(dtype)))  # [r]
        match = content @ question / math.sqrt(self.coupling_dim)
        coupled = torch.cat([content * question, content], dim=-1)
        return match + self.mlp(coupled).squeeze(-1)
