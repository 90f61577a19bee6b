"""The DuDoCROP pipeline: OSRO (Eq. 10-15), the end-to-end model object (Algorithm 2) and the Table V rows."""

from dudocrop.pipeline.ablation import TABLE_V, AblationRow, ablation_outputs
from dudocrop.pipeline.model import DuDoCROP, DuDoCROPOutput, PipelineConfig, save_pipeline_meta
from dudocrop.pipeline.osro import OSROConfig, OSROResult, fuse, minmax_norm, osro, sinogram_prior

__all__ = ["TABLE_V", "AblationRow", "DuDoCROP", "DuDoCROPOutput", "OSROConfig", "OSROResult", "PipelineConfig",
           "ablation_outputs", "fuse", "minmax_norm", "osro", "save_pipeline_meta", "sinogram_prior"]
