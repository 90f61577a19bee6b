"""Ray Serve application for DuDoCROP inference (planned: DICOM/NumPy in and out, batching, GPU autoscaling)."""
