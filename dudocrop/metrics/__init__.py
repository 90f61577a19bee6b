"""Image-quality metrics (PSNR, SSIM, RMSE in HU; conventions in ``metrics.image``), LPIPS with a local AlexNet
backbone (``metrics.lpips``) and the perceptual indicators PI_q / PI_s of Eq. 18-19 (``metrics.perceptual``)."""

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
from dudocrop.metrics.lpips import (
    LPIPS_WINDOW_HU,
    LPIPSMetric,
    LPIPSUnavailable,
    alexnet_weights_path,
    load_lpips,
    lpips_available,
    lpips_distance,
)
from dudocrop.metrics.perceptual import (
    LOCAL_REGIONS,
    LPIPS_SCALE,
    LocalRegion,
    local_lp,
    lp_quantity,
    lp_size,
    metal_objects,
    pi_q,
    pi_s,
    sensitivity,
)

__all__ = [
    "BODY_THRESHOLD_HU",
    "CT_RANGE_HU",
    "DISPLAY_WINDOW_HU",
    "ERROR_WINDOW_HU",
    "LOCAL_REGIONS",
    "LPIPSMetric",
    "LPIPSUnavailable",
    "LPIPS_SCALE",
    "LPIPS_WINDOW_HU",
    "LocalRegion",
    "alexnet_weights_path",
    "body_mask",
    "image_metrics",
    "load_lpips",
    "local_lp",
    "lp_quantity",
    "lp_size",
    "lpips_available",
    "lpips_distance",
    "metal_objects",
    "pi_q",
    "pi_s",
    "psnr",
    "rmse",
    "sensitivity",
    "ssim",
]
