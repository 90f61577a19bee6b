"""IR-SDE diffusion for the image, sinogram and residual domains (paper §III-B-2, Eq. 4-9): the schedule, loss and
samplers (``irsde``), separate from the embedding-guided conditional U-Net (``unet``, Fig. 3b)."""

from dudocrop.sde.config import (
    PAPER_LAMBDA_255,
    PAPER_T,
    SDE_PRESETS,
    UNET_PRESETS,
    SDEConfig,
    UNetConfig,
    get_sde_config,
    get_unet_config,
)
from dudocrop.sde.irsde import IRSDE, cosine_thetas
from dudocrop.sde.train import (
    TRAIN_PRESETS,
    SDEModel,
    SDETrainConfig,
    get_train_config,
    load_sde_model,
    save_sde_model,
    sde_train_step,
    validate,
)
from dudocrop.sde.unet import ConditionalUNet, build_unet, count_parameters

__all__ = [
    "IRSDE",
    "PAPER_LAMBDA_255",
    "PAPER_T",
    "SDE_PRESETS",
    "TRAIN_PRESETS",
    "UNET_PRESETS",
    "ConditionalUNet",
    "SDEConfig",
    "SDEModel",
    "SDETrainConfig",
    "UNetConfig",
    "build_unet",
    "cosine_thetas",
    "count_parameters",
    "get_sde_config",
    "get_train_config",
    "load_sde_model",
    "save_sde_model",
    "sde_train_step",
    "get_unet_config",
    "validate",
]
