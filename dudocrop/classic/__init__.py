"""Classic sinogram-completion MAR baselines: LI (Kalender 1987) and NMAR (Meyer 2010)."""

from dudocrop.classic.li import interpolate_trace, li, reinsert_metal
from dudocrop.classic.nmar import kmeans_thresholds, nmar, nmar_prior, normalized_interpolation

__all__ = ["interpolate_trace", "kmeans_thresholds", "li", "nmar", "nmar_prior", "normalized_interpolation",
           "reinsert_metal"]
