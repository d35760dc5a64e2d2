"""Image and feature-distribution quality metrics in plain torch.

psnr and ssim score each image of a batch and return a per-image tensor [N],
so callers choose how to aggregate (a mean of PSNR is undefined as soon as one
image is reproduced exactly). relative_l2 and frechet_distance return one
float for the whole input. Everything is computed in float64.
"""
import torch

_SSIM_WINDOW = 11
_SSIM_SIGMA = 1.5
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _check_same_shape(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image of [N, ...] batches:
    a tensor [N]; inf where the two images are identical."""
    _check_same_shape(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


def _gaussian_window(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    coords = torch.arange(_SSIM_WINDOW, dtype=dtype, device=device) - (_SSIM_WINDOW - 1) / 2
    profile = torch.exp(-coords ** 2 / (2 * _SSIM_SIGMA ** 2))
    profile = profile / profile.sum()
    return profile[:, None] * profile[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of each image of [N, C, H, W]
    batches: a tensor [N]. 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, local statistics over the valid region only (no padding), the
    SSIM map averaged over positions and channels."""
    _check_same_shape(a, b)
    if a.dim() != 4:
        raise ValueError(f"ssim expects [N, C, H, W] images, got shape {tuple(a.shape)}")
    if min(a.shape[-2:]) < _SSIM_WINDOW:
        raise ValueError(f"ssim needs images of at least {_SSIM_WINDOW}x{_SSIM_WINDOW}, got {tuple(a.shape[-2:])}")
    # float64: the variances are differences of large, nearly equal moments
    a, b = a.double(), b.double()
    channels = a.shape[1]
    window = _gaussian_window(a.dtype, a.device).expand(channels, 1, _SSIM_WINDOW, _SSIM_WINDOW)

    def local_mean(x):
        return torch.nn.functional.conv2d(x, window, groups=channels)

    mean_a, mean_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mean_a ** 2
    var_b = local_mean(b * b) - mean_b ** 2
    cov_ab = local_mean(a * b) - mean_a * mean_b
    c1 = (_SSIM_K1 * data_range) ** 2
    c2 = (_SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mean_a * mean_b + c1) * (2 * cov_ab + c2)) / (
        (mean_a ** 2 + mean_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(dim=1)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the whole tensors (b is the reference)."""
    _check_same_shape(a, b)
    reference_norm = torch.linalg.vector_norm(b.double())
    if reference_norm == 0:
        raise ValueError("relative_l2: the reference b has zero norm")
    return float(torch.linalg.vector_norm(a.double() - b.double()) / reference_norm)


def _symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix; rounding can
    leave tiny negative eigenvalues, which are taken as zero."""
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def _covariance(features: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance [D, D] of samples [N, D] (torch.cov returns a scalar when D = 1)."""
    centred = features - features.mean(dim=0)
    return centred.T @ centred / (features.shape[0] - 1)


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]
    (sample means, unbiased covariances), as in FID:
    |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr(sqrt(S_a^1/2 S_b S_a^1/2)).
    Computed in float64; the inner matrix is symmetric, so both square roots
    come from symmetric eigendecompositions."""
    for name, features in (("features_a", features_a), ("features_b", features_b)):
        if features.dim() != 2:
            raise ValueError(f"{name} must be [N, D], got shape {tuple(features.shape)}")
        if features.shape[0] < 2:
            raise ValueError(f"{name} has {features.shape[0]} sample(s): a covariance needs at least 2")
    if features_a.shape[1] != features_b.shape[1]:
        raise ValueError(f"feature dimensions differ: {features_a.shape[1]} vs {features_b.shape[1]}")
    features_a, features_b = features_a.double(), features_b.double()
    mean_a, mean_b = features_a.mean(dim=0), features_b.mean(dim=0)
    cov_a, cov_b = _covariance(features_a), _covariance(features_b)
    sqrt_cov_a = _symmetric_sqrt(cov_a)
    inner = sqrt_cov_a @ cov_b @ sqrt_cov_a
    inner = (inner + inner.T) / 2   # symmetric in exact arithmetic; remove the rounding asymmetry
    trace_sqrt = torch.linalg.eigvalsh(inner).clamp(min=0).sqrt().sum()
    distance = (mean_a - mean_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt
    return float(distance)
