"""Image-quality metrics (PSNR, SSIM, RMSE in HU) and evaluation masks; conventions in ``metrics.image``."""

from dudocrop.metrics.image import (
    BODY_THRESHOLD_HU,
    CT_RANGE_HU,
    DISPLAY_WINDOW_HU,
    ERROR_WINDOW_HU,
    body_mask,
    image_metrics,
    psnr,
    rmse,
    ssim,
)

__all__ = [
    "BODY_THRESHOLD_HU",
    "CT_RANGE_HU",
    "DISPLAY_WINDOW_HU",
    "ERROR_WINDOW_HU",
    "body_mask",
    "image_metrics",
    "psnr",
    "rmse",
    "ssim",
]
