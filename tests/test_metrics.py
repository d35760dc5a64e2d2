"""accel_core.metrics against analytic values and independent numpy/scipy
implementations."""
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from accel_core.metrics import frechet_distance, psnr, relative_l2, ssim


def _images(seed: int, shape=(2, 3, 32, 32)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_psnr_of_a_constant_offset_is_analytic():
    reference = _images(0) * 0.8
    shifted = reference + 0.1                     # MSE = 0.01 in every image
    assert psnr(shifted, reference).tolist() == pytest.approx([20.0, 20.0], abs=1e-9)
    assert psnr(shifted, reference, data_range=2.0).tolist() == pytest.approx([10 * math.log10(400)] * 2, abs=1e-9)


def test_psnr_is_per_image_and_infinite_for_identical_images():
    reference = _images(1)
    distorted = reference.clone()
    distorted[1] += 0.01                          # MSE 1e-4 -> 40 dB; image 0 untouched
    values = psnr(distorted, reference)
    assert values.shape == (2,)
    assert math.isinf(values[0]) and values[0] > 0
    assert values[1].item() == pytest.approx(40.0, abs=1e-9)


def test_ssim_of_identical_images_is_one():
    images = _images(2)
    assert torch.allclose(ssim(images, images), torch.ones(2, dtype=torch.float64), atol=1e-12)


def test_ssim_of_two_constant_images_is_the_luminance_term():
    # No variance anywhere: SSIM = (2 m1 m2 + C1) / (m1^2 + m2^2 + C1).
    first = torch.full((1, 3, 16, 16), 0.2, dtype=torch.float64)
    second = torch.full((1, 3, 16, 16), 0.6, dtype=torch.float64)
    c1 = (0.01 * 1.0) ** 2
    expected = (2 * 0.2 * 0.6 + c1) / (0.2 ** 2 + 0.6 ** 2 + c1)
    assert ssim(first, second).item() == pytest.approx(expected, abs=1e-12)


def _numpy_ssim(first: np.ndarray, second: np.ndarray, data_range: float) -> float:
    """Independent SSIM of one [C, H, W] pair: every 11x11 window explicitly,
    (co)variances as weighted E[(x - mu_x)(y - mu_y)] within it."""
    offsets = np.arange(11) - 5.0
    profile = np.exp(-offsets ** 2 / (2 * 1.5 ** 2))
    weights = np.outer(profile, profile) / profile.sum() ** 2
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    maps = []
    for x, y in zip(first.astype(np.float64), second.astype(np.float64)):
        windows_x = np.lib.stride_tricks.sliding_window_view(x, (11, 11))   # [H-10, W-10, 11, 11]
        windows_y = np.lib.stride_tricks.sliding_window_view(y, (11, 11))
        mu_x = (windows_x * weights).sum(axis=(-2, -1))
        mu_y = (windows_y * weights).sum(axis=(-2, -1))
        dev_x, dev_y = windows_x - mu_x[..., None, None], windows_y - mu_y[..., None, None]
        sigma_xx = (weights * dev_x * dev_x).sum(axis=(-2, -1))
        sigma_yy = (weights * dev_y * dev_y).sum(axis=(-2, -1))
        sigma_xy = (weights * dev_x * dev_y).sum(axis=(-2, -1))
        maps.append(((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2))
                    / ((mu_x ** 2 + mu_y ** 2 + c1) * (sigma_xx + sigma_yy + c2)))
    return float(np.mean(maps))


@pytest.mark.parametrize("data_range", [1.0, 2.0])
def test_ssim_matches_an_independent_numpy_implementation(data_range):
    reference = _images(3, (3, 3, 40, 48)) * data_range
    noise = 0.2 * data_range * torch.randn(reference.shape, generator=torch.Generator().manual_seed(4))
    distorted = (reference + noise).clamp(0, data_range)
    values = ssim(distorted, reference, data_range=data_range)
    expected = [_numpy_ssim(d.numpy(), r.numpy(), data_range) for d, r in zip(distorted, reference)]
    assert values.tolist() == pytest.approx(expected, abs=1e-10)
    assert max(expected) < 0.9                    # the noise is large enough to matter


def test_ssim_decreases_as_noise_grows():
    reference = torch.nn.functional.avg_pool2d(_images(5, (4, 3, 64, 64)), 3, stride=1, padding=1)
    generator = torch.Generator().manual_seed(6)
    scores = [ssim((reference + level * torch.randn(reference.shape, generator=generator)).clamp(0, 1),
                   reference).mean().item() for level in (0.02, 0.05, 0.1, 0.2)]
    assert all(earlier > later for earlier, later in zip(scores, scores[1:])), scores


def test_ssim_rejects_images_smaller_than_the_window():
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8))


def test_relative_l2_known_value():
    reference = torch.tensor([[3.0, 4.0]], dtype=torch.float64)   # norm 5
    assert relative_l2(reference + torch.tensor([[0.3, 0.4]], dtype=torch.float64), reference) == pytest.approx(0.1, abs=1e-12)
    assert relative_l2(torch.zeros(1, 2), reference) == pytest.approx(1.0, abs=1e-12)
    with pytest.raises(ValueError, match="zero norm"):
        relative_l2(reference, torch.zeros(1, 2))


def test_frechet_distance_of_a_set_with_itself_is_zero():
    features = torch.randn(300, 16, generator=torch.Generator().manual_seed(7)) @ torch.randn(
        16, 16, generator=torch.Generator().manual_seed(8))
    assert abs(frechet_distance(features, features)) < 1e-8 * features.var(dim=0).sum().item()


def _samples_with_exact_moments(count: int, mean: torch.Tensor, variances: torch.Tensor, seed: int) -> torch.Tensor:
    """Samples whose sample mean and unbiased sample covariance are exactly
    `mean` and diag(`variances`): whitened Gaussian draws, rescaled."""
    draws = torch.randn(count, mean.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    centred = draws - draws.mean(dim=0)
    cholesky = torch.linalg.cholesky(centred.T @ centred / (count - 1))
    white = torch.linalg.solve_triangular(cholesky, centred.T, upper=False).T
    return white * variances.sqrt() + mean


def test_frechet_distance_of_diagonal_gaussians_is_analytic():
    mean_a, var_a = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64), torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64)
    mean_b, var_b = torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), torch.tensor([9.0, 1.0, 0.25], dtype=torch.float64)
    features_a = _samples_with_exact_moments(50, mean_a, var_a, seed=9)
    features_b = _samples_with_exact_moments(80, mean_b, var_b, seed=10)
    # |mu_a - mu_b|^2 + sum (sqrt(s_a) - sqrt(s_b))^2 = 5 + (4 + 1 + 0) = 10
    assert frechet_distance(features_a, features_b) == pytest.approx(10.0, abs=1e-9)


def test_frechet_distance_matches_scipy_sqrtm_on_random_data():
    generator = torch.Generator().manual_seed(11)
    features_a = torch.randn(400, 12, generator=generator) @ torch.randn(12, 12, generator=generator)
    features_b = torch.randn(300, 12, generator=generator) @ torch.randn(12, 12, generator=generator) + 0.5
    a, b = features_a.double().numpy(), features_b.double().numpy()
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    expected = (np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2) + np.trace(cov_a) + np.trace(cov_b)
                - 2 * np.trace(scipy.linalg.sqrtm(cov_a @ cov_b)).real)
    assert frechet_distance(features_a, features_b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(features_b, features_a) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_needs_two_samples_and_matching_dimensions():
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(1, 4), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="at least 2"):
        frechet_distance(torch.zeros(5, 4), torch.zeros(1, 4))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(torch.zeros(5, 4), torch.zeros(5, 3))
