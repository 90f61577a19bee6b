"""DuDoCROP: dual-domain CLIP-assisted residual optimisation for CT metal artifact reduction.

The library is pure Python + torch; Ray orchestration lives in ``ray_jobs/`` and ``serve/``.
"""

__version__ = "0.1.0"
