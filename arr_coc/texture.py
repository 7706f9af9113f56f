"""The 13-channel texture array: cheap, fixed image statistics at the merged vision-token grid.

The allocator scores every merged vision token (one cell of ``merge*patch`` pixels). Besides the
frozen vision features it looks at hand-made maps that say *where something is going on* in the
image, pooled to the same grid:

====  ===================  =================================================================
 ch   name                 what it is
====  ===================  =================================================================
 0-2  red, green, blue     cell-mean colour, in [0, 1]
 3    pos_y                cell-centre row, 0 (top) .. 1 (bottom)
 4    pos_x                cell-centre column, 0 (left) .. 1 (right)
 5    sobel_x              mean |horizontal gradient| of luminance (lights vertical edges)
 6    sobel_y              mean |vertical gradient| of luminance (lights horizontal edges)
 7    sobel_mag            mean gradient magnitude
 8    saliency_spectral    spectral residual saliency (Hou & Zhang 2007)
 9    saliency_contrast    centre-surround contrast in colour-opponent space (L, R-G, B-Y)
 10   saliency_global      distance of the cell's colour from the image's mean colour
                           (frequency-tuned saliency, Achanta et al. 2009)
 11   luminance_std        standard deviation of luminance inside the cell (texture energy)
 12   cluster_distance     distance of the cell colour to the nearest of k k-means colour
                           clusters of the image (colour outliers and mixed-colour cells)
====  ===================  =================================================================

Normalisation: colour and position channels are absolute and already lie in [0, 1]. The
contrast-type channels (5-12) are *relative*: each is divided by its maximum over the image so
the strongest cell reads 1, which makes them invariant to global contrast and exposure. The
three Sobel channels share one divisor (the magnitude's maximum) so their ratios survive. Every
divisor has a floor, so a nearly flat image gives near-zero maps instead of amplified noise.

Everything is vectorised over pixels and cells (convolutions, pooling, FFT); the only Python
loops run over a handful of k-means iterations and blur scales, never over patches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

TEXTURE_CHANNELS = (
    "red",
    "green",
    "blue",
    "pos_y",
    "pos_x",
    "sobel_x",
    "sobel_y",
    "sobel_mag",
    "saliency_spectral",
    "saliency_contrast",
    "saliency_global",
    "luminance_std",
    "cluster_distance",
)
NUM_CHANNELS = len(TEXTURE_CHANNELS)

# Pixel statistics are computed with at most this many pixels per cell side: a 32-px Qwen3-VL
# cell is area-downsampled 2x first, which keeps edges and texture visible at a quarter the cost.
MAX_CELL_PIXELS = 16
# The smallest cell the statistics make sense for (an in-cell variance needs > 1 pixel).
MIN_CELL_PIXELS = 2
# Spectral residual runs at this many pixels per cell: saliency at the scale of a few tokens,
# as the original method runs on a ~64-px thumbnail.
SPECTRAL_CELL_PIXELS = 4
# Amplitude floor, relative to the mean amplitude, before the log (see spectral_residual).
SPECTRAL_AMPLITUDE_FLOOR = 0.1
CLUSTERS = 4
KMEANS_ITERS = 6
CONTRAST_SCALES = (1.0, 3.0)  # surround blur sigmas, in cells

# Divisor floors of the relative channels (see the module docstring), in each channel's units.
EDGE_FLOOR = 0.05  # mean |Sobel| / 4 per pixel: a 5% step edge filling a cell
SALIENCY_FLOOR = 1e-6
CONTRAST_FLOOR = 0.05  # opponent-space distance
STD_FLOOR = 0.02  # luminance std
_EPS = 1e-8

_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def cell_pixels(image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> tuple[int, int]:
    """Pixels per cell side at the working resolution (at most ``MAX_CELL_PIXELS``)."""
    (height, width), (gh, gw) = image_hw, grid_hw
    return min(height // gh, MAX_CELL_PIXELS), min(width // gw, MAX_CELL_PIXELS)


def working_image(image: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """``image`` area-resampled to ``(gh*ch, gw*cw)`` float32 pixels, so cells are whole pixels.

    Images at the processor's size are exact multiples of the cell; this only downsamples large
    cells (and absorbs a remainder if a caller passes a size that is not a multiple).
    """
    image = image.float()
    gh, gw = grid_hw
    ch, cw = cell_pixels(tuple(image.shape[-2:]), grid_hw)
    if ch < 1 or cw < 1:
        raise ValueError(f"image of {tuple(image.shape)} is smaller than the merged grid {gh}x{gw}")
    target = (gh * ch, gw * cw)
    if tuple(image.shape[-2:]) == target:
        return image
    return F.interpolate(image[None], size=target, mode="area")[0]


def luminance(rgb: Tensor) -> Tensor:
    """Rec. 601 luma of ``[3, H, W]`` → ``[H, W]``."""
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def opponent(rgb: Tensor) -> Tensor:
    """Colour-opponent channels (luminance, red-green, blue-yellow) of ``[3, ...]``, each in ~[-1, 1]."""
    red, green, blue = rgb[0], rgb[1], rgb[2]
    return torch.stack([luminance(rgb), red - green, blue - 0.5 * (red + green)])


def cell_mean(maps: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Average ``[C, gh*ch, gw*cw]`` pixel maps over each cell → ``[C, gh, gw]``."""
    ch, cw = maps.shape[-2] // grid_hw[0], maps.shape[-1] // grid_hw[1]
    return F.avg_pool2d(maps[None], kernel_size=(ch, cw))[0]


def gaussian_blur(maps: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of ``[C, H, W]`` with edge replication (no dark borders)."""
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = maps.shape[0]
    x = F.pad(maps[None], (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1).contiguous(), groups=channels)
    x = F.conv2d(x, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1).contiguous(), groups=channels)
    return x[0]


def _relative(maps: Tensor, floor: float, reference: Tensor | None = None) -> Tensor:
    """Divide by the image maximum of ``reference`` (default ``maps``), never by less than ``floor``."""
    reference = maps if reference is None else reference
    return maps / reference.max().clamp_min(floor)


def position_channels(grid_hw: tuple[int, int], device: torch.device) -> Tensor:
    """Row and column of each cell centre, spanning [0, 1] (0.5 for a single row/column)."""

    def axis(n: int) -> Tensor:
        if n == 1:
            return torch.full((1,), 0.5, device=device)
        return torch.linspace(0.0, 1.0, n, device=device)

    rows, cols = torch.meshgrid(axis(grid_hw[0]), axis(grid_hw[1]), indexing="ij")
    return torch.stack([rows, cols])


def sobel_channels(luma: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Cell means of |Gx|, |Gy| and the gradient magnitude, sharing one relative scale."""
    kernel_x = _SOBEL_X.to(luma.device, luma.dtype)
    kernels = torch.stack([kernel_x, kernel_x.T])[:, None]
    padded = F.pad(luma[None, None], (1, 1, 1, 1), mode="replicate")
    grad = F.conv2d(padded, kernels)[0] / 4.0  # a full-contrast step edge reads 1
    magnitude = grad.pow(2).sum(0, keepdim=True).sqrt()
    cells = cell_mean(torch.cat([grad.abs(), magnitude]), grid_hw)
    return _relative(cells, EDGE_FLOOR, reference=cells[2])


def spectral_residual(luma: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Spectral residual saliency pooled to the grid, in [0, 1].

    The log-amplitude spectrum of natural images is smooth; what sticks out of its local
    average (the residual) belongs to the unexpected parts of the image. Transforming the
    residual back with the original phase gives a map that lights those parts. Two guards
    against artefacts of clean (synthetic, flat-background) images: the image is mirrored into a
    seamless periodic tile, so the FFT's wrap-around does not light the borders, and the
    amplitude gets a small relative floor, so near-zero frequencies do not dominate the residual.
    """
    gh, gw = grid_hw
    side = min(SPECTRAL_CELL_PIXELS, luma.shape[0] // gh, luma.shape[1] // gw)
    small = F.interpolate(luma[None, None], size=(gh * side, gw * side), mode="area")[0, 0]
    small = small - small.mean()
    if small.abs().max() < 1e-4:  # flat image: nothing can stand out
        return torch.zeros(1, gh, gw, device=luma.device)
    height, width = small.shape
    tile = torch.cat([small, small.flip(0)], 0)
    tile = torch.cat([tile, tile.flip(1)], 1)
    spectrum = torch.fft.fft2(tile)
    amplitude = spectrum.abs()
    log_amplitude = torch.log(amplitude + SPECTRAL_AMPLITUDE_FLOOR * amplitude.mean() + _EPS)
    # The spectrum is periodic, so its local average wraps around.
    local_mean = F.avg_pool2d(F.pad(log_amplitude[None, None], (1, 1, 1, 1), mode="circular"), 3, stride=1)
    residual = log_amplitude - local_mean[0, 0]
    back = torch.fft.ifft2(torch.exp(torch.complex(residual, torch.angle(spectrum))))
    saliency = back.abs().pow(2)[:height, :width]
    saliency = gaussian_blur(saliency[None], sigma=max(1.0, side / 2.0))
    return _relative(cell_mean(saliency, grid_hw), SALIENCY_FLOOR)


def contrast_channels(cell_rgb: Tensor) -> Tensor:
    """Centre-surround and global colour contrast of ``[3, gh, gw]`` cell colours → ``[2, gh, gw]``."""
    centre = opponent(cell_rgb)
    local = torch.zeros_like(centre[0])
    for sigma in CONTRAST_SCALES:
        surround = gaussian_blur(centre, sigma)
        local = local + (centre - surround).pow(2).sum(0).sqrt()
    image_mean = centre.mean(dim=(1, 2), keepdim=True)
    global_distance = (gaussian_blur(centre, 0.5) - image_mean).pow(2).sum(0).sqrt()
    return torch.stack(
        [_relative(local, CONTRAST_FLOOR * len(CONTRAST_SCALES)), _relative(global_distance, CONTRAST_FLOOR)]
    )


def luminance_std(luma: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """Per-cell standard deviation of luminance (texture energy), relative.

    Two-pass (deviations from the cell mean), because ``E[x^2] - E[x]^2`` cancels badly in
    float32 and would turn a flat cell into noise.
    """
    means = cell_mean(luma[None], grid_hw)
    spread = luma[None] - F.interpolate(means[None], size=luma.shape, mode="nearest")[0]
    std = cell_mean(spread * spread, grid_hw)[0].sqrt()
    return _relative(std, STD_FLOOR)[None]


def cluster_distance(cell_rgb: Tensor, clusters: int = CLUSTERS, iters: int = KMEANS_ITERS) -> Tensor:
    """Distance of each cell colour to the nearest of ``clusters`` k-means centres, relative.

    Deterministic: centres start at the colours of the cells at evenly spaced luminance
    quantiles, then a few Lloyd iterations run on all cells at once.
    """
    colours = cell_rgb.flatten(1).T  # [N, 3]
    count = colours.shape[0]
    order = torch.argsort(luminance(colours.T))
    picks = ((torch.arange(clusters, device=colours.device) + 0.5) * count / clusters).long()
    centres = colours[order[picks.clamp_max(count - 1)]]
    for _ in range(iters):
        assign = torch.cdist(colours, centres).argmin(1)
        one_hot = F.one_hot(assign, clusters).to(colours.dtype)  # [N, k]
        sizes = one_hot.sum(0)
        sums = one_hot.T @ colours
        # An empty cluster keeps its previous centre.
        centres = torch.where(sizes[:, None] > 0, sums / sizes.clamp_min(1.0)[:, None], centres)
    distance = torch.cdist(colours, centres).min(1).values.view(cell_rgb.shape[1:])
    return _relative(distance, CONTRAST_FLOOR)[None]


@torch.no_grad()
def texture_array(image: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """The ``[13, gh, gw]`` float32 texture array of ``image`` (``[3, H, W]`` in [0, 1]).

    ``grid_hw`` is the *merged* token grid; ``H`` and ``W`` are normally ``gh`` and ``gw`` times
    the merged cell (``merge * patch`` pixels). Channel order: :data:`TEXTURE_CHANNELS`.
    """
    grid_hw = (int(grid_hw[0]), int(grid_hw[1]))
    rgb = working_image(image, grid_hw)
    luma = luminance(rgb)
    cell_rgb = cell_mean(rgb, grid_hw)
    channels = [
        cell_rgb,
        position_channels(grid_hw, rgb.device),
        sobel_channels(luma, grid_hw),
        spectral_residual(luma, grid_hw),
        contrast_channels(cell_rgb),
        luminance_std(luma, grid_hw),
        cluster_distance(cell_rgb),
    ]
    return torch.cat(channels)
