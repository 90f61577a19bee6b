"""The MAR service: a Ray Serve application (``serve/app.py``) of an HTTP ingress and a batched DuDoCROP model
deployment; ``python -m serve`` runs it locally, ``serve/config.yaml`` is its Serve config (README, Serving)."""
