"""The DuDoCROP pipeline: OSRO (Eq. 10-15) and the end-to-end model object."""

from dudocrop.pipeline.osro import OSROConfig, OSROResult, fuse, minmax_norm, osro, sinogram_prior

__all__ = ["OSROConfig", "OSROResult", "fuse", "minmax_norm", "osro", "sinogram_prior"]
