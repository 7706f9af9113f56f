import pytest
import torch

from arr_coc.texture import NUM_CHANNELS, TEXTURE_CHANNELS, texture_array

CH = {name: i for i, name in enumerate(TEXTURE_CHANNELS)}
RELATIVE = [CH[n] for n in TEXTURE_CHANNELS[5:]]
SALIENCY = ("saliency_spectral", "saliency_contrast", "saliency_global")


def grey(size: int, level: float = 0.5) -> torch.Tensor:
    return torch.full((3, size, size), level)


def test_shape_dtype_device_and_ranges():
    image = torch.rand(3, 96, 64, dtype=torch.float64)
    texture = texture_array(image, (6, 4))
    assert texture.shape == (NUM_CHANNELS, 6, 4) == (13, 6, 4)
    assert texture.dtype == torch.float32 and texture.device == image.device
    assert torch.isfinite(texture).all()
    assert texture.min() >= 0.0 and texture.max() <= 1.0 + 1e-6


def test_colour_channels_are_cell_means():
    image = torch.zeros(3, 32, 32)
    image[0, :16] = 1.0  # top half red
    image[2, 16:] = 0.25  # bottom half dark blue
    texture = texture_array(image, (2, 2))
    assert torch.allclose(texture[CH["red"]], torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    assert torch.allclose(texture[CH["blue"]], torch.tensor([[0.0, 0.0], [0.25, 0.25]]))


def test_position_channels_span_unit_interval():
    texture = texture_array(torch.rand(3, 40, 60), (4, 6))
    rows, cols = texture[CH["pos_y"]], texture[CH["pos_x"]]
    assert torch.allclose(rows[:, 0], torch.linspace(0, 1, 4)) and torch.allclose(cols[0], torch.linspace(0, 1, 6))
    assert torch.allclose(rows, rows[:, :1].expand_as(rows))  # constant along a row
    assert torch.allclose(cols, cols[:1].expand_as(cols))


def test_vertical_edge_lights_sobel_x_not_sobel_y():
    image = torch.zeros(3, 64, 64)
    image[:, :, 36:] = 1.0  # vertical edge inside column 4 of an 8x8 grid (8-px cells)
    texture = texture_array(image, (8, 8))
    sobel_x, sobel_y = texture[CH["sobel_x"]], texture[CH["sobel_y"]]
    assert sobel_x[:, 4].min() > 0.5
    assert sobel_y.abs().max() < 1e-6
    assert sobel_x[:, [0, 1, 2, 6, 7]].abs().max() < 1e-6  # flat regions far from the edge
    transposed = texture_array(image.transpose(1, 2).contiguous(), (8, 8))
    assert transposed[CH["sobel_y"]][4].min() > 0.5 and transposed[CH["sobel_x"]].abs().max() < 1e-6


def odd_one_out(size: int = 128, cells: int = 8, at: tuple[int, int] = (2, 5), span: int = 1) -> torch.Tensor:
    """Grey image with one red square covering ``span`` x ``span`` cells at cell ``at``."""
    cell = size // cells
    image = grey(size)
    top, left = at[0] * cell, at[1] * cell
    image[:, top : top + span * cell, left : left + span * cell] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]
    return image


@pytest.mark.parametrize("channel", SALIENCY)
def test_saliency_highlights_a_small_odd_blob(channel):
    texture = texture_array(odd_one_out(), (8, 8))
    saliency = texture[CH[channel]]
    background = torch.ones(8, 8, dtype=torch.bool)
    background[1:4, 4:7] = False  # the blob cell and its neighbours
    assert saliency[2, 5] == saliency.max()
    assert saliency[2, 5] > 4 * saliency[background].mean()


def test_saliency_is_not_a_copy_of_the_edges():
    texture = texture_array(odd_one_out(size=128, cells=8, at=(2, 2), span=3), (8, 8))
    sobel = texture[CH["sobel_mag"]]
    assert sobel[3, 3] < 1e-6  # flat inside a 3x3-cell blob: no edges
    assert texture[CH["saliency_contrast"], 3, 3] > 0.3
    assert texture[CH["saliency_global"], 3, 3] > 0.9
    for name in SALIENCY:
        assert (texture[CH[name]] - sobel).abs().max() > 0.2, name


def test_luminance_std_and_clusters_react_to_texture():
    image = grey(64)
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2
    image[:, 16:32, 32:48] = checker.float()  # a fine checkerboard in cell (1, 2) of a 4x4 grid
    texture = texture_array(image, (4, 4))
    std = texture[CH["luminance_std"]]
    assert std[1, 2] == 1.0 and (std.flatten()[torch.arange(16) != 6] < 1e-6).all()
    assert torch.isfinite(texture[CH["cluster_distance"]]).all()


def test_cluster_distance_marks_a_colour_outside_the_main_palette():
    image = torch.zeros(3, 64, 64)
    image[:, :32, :32] = torch.tensor([0.9, 0.1, 0.1])[:, None, None]  # four large colour regions
    image[:, :32, 32:] = torch.tensor([0.1, 0.8, 0.1])[:, None, None]
    image[:, 32:, :32] = torch.tensor([0.1, 0.1, 0.9])[:, None, None]
    image[:, 32:, 32:] = torch.tensor([0.9, 0.9, 0.2])[:, None, None]
    image[:, 40:48, 8:16] = torch.tensor([0.0, 0.7, 0.8])[:, None, None]  # one cyan cell (5, 1)
    distance = texture_array(image, (8, 8))[CH["cluster_distance"]]
    assert distance[5, 1] == 1.0
    others = torch.ones(8, 8, dtype=torch.bool)
    others[5, 1] = False
    assert distance[others].max() < 0.1


def test_flat_image_gives_zero_relative_channels():
    texture = texture_array(grey(64, 0.3), (4, 4))
    assert torch.isfinite(texture).all()
    assert texture[RELATIVE].abs().max() < 1e-4  # float32 rounding only, not amplified noise
    assert torch.allclose(texture[CH["red"]], torch.full((4, 4), 0.3))
    # Faint sensor noise stays faint: the divisor floors keep it from being stretched to 1.
    noisy = texture_array(grey(64, 0.3) + 0.002 * torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)), (4, 4))
    for name in ("sobel_mag", "saliency_contrast", "saliency_global", "luminance_std", "cluster_distance"):
        assert noisy[CH[name]].max() < 0.2, name


def test_large_grid_is_vectorised():
    # 64x64 merged grid (4096 cells): no per-patch Python loop, so this is a handful of ops.
    texture = texture_array(torch.rand(3, 256, 256), (64, 64))
    assert texture.shape == (13, 64, 64) and torch.isfinite(texture).all()


def test_size_not_a_multiple_of_the_grid_and_large_cells():
    assert texture_array(torch.rand(3, 130, 100), (8, 6)).shape == (13, 8, 6)
    big_cells = texture_array(odd_one_out(size=256, cells=4, at=(1, 2)), (4, 4))  # 64-px cells
    assert big_cells[CH["saliency_global"]].argmax() == 1 * 4 + 2
