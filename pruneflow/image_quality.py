"""Image-quality metrics of super-resolution: PSNR and SSIM on the Y (luma) channel, per image.

Both take batches N×C×H×W of floats in [0, 1]. A 3-channel batch is first reduced to its luma Y with the
BT.601 full-range weights (what PIL's ``convert("YCbCr")`` computes, as the data pipeline does), because
SR papers, Zhong 2022 included, report PSNR on Y. Outputs are clamped to [0, 1] before scoring: a deployed
image cannot hold values outside the range, and scoring them would penalise what the viewer never sees.

PSNR = 10·log10(1 / MSE), ∞ for identical images. SSIM follows Wang et al. 2004 as scikit-image computes
it with ``gaussian_weights=True, use_sample_covariance=False, data_range=1``: an 11×11 Gaussian window
(σ = 1.5), K1 = 0.01, K2 = 0.03, averaged over the positions where the window fits in the image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Y_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma, full range (JPEG / PIL)


def luma(images: torch.Tensor) -> torch.Tensor:
    """N×1×H×W luma of an RGB or single-channel batch."""
    if images.shape[1] == 1:
        return images
    if images.shape[1] != 3:
        raise ValueError(f"luma needs 1 or 3 channels, got {images.shape[1]}")
    weights = torch.tensor(Y_WEIGHTS, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def psnr_y(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on Y (a tensor of N values; ∞ where an image is reproduced exactly)."""
    error = (luma(outputs.clamp(0, 1)) - luma(targets)).double().pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(1.0 / error)).float()  # 1/0 = inf: identical images


def _gaussian_window(size: int, sigma: float, device: torch.device) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
    kernel = torch.exp(-coords**2 / (2 * sigma**2))
    return kernel / kernel.sum()


def ssim_y(outputs: torch.Tensor, targets: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM on Y (N values in [-1, 1]; 1 for identical images). Images smaller than the window
    use the largest odd window that fits."""
    x, y = luma(outputs.clamp(0, 1)).double(), luma(targets).double()
    size = min(window, *[s if s % 2 else s - 1 for s in x.shape[-2:]])
    kernel = _gaussian_window(size, sigma, x.device)

    def blur(image: torch.Tensor) -> torch.Tensor:  # separable Gaussian, 'valid' positions only
        return F.conv2d(F.conv2d(image, kernel.view(1, 1, -1, 1)), kernel.view(1, 1, 1, -1))

    c1, c2 = 0.01**2, 0.03**2
    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()
