"""Serving machinery that is not Ray: decoding and bounding untrusted inputs (:mod:`.inputs`), mapping any pixel
grid to the model's and back (:mod:`.grid`), and the job store + slice queue of whole-study jobs (:mod:`.jobs`).

The Ray Serve app (``serve/``) and a batch job (a PACS integration) share these; none of them imports Ray.
"""

from dudocrop.service.inputs import InputError, Limits

__all__ = ["InputError", "Limits"]
