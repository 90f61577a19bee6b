"""Data layer: readers (AAPM CT-MAR, clinical NIfTI/DICOM, synthetic), the slice schema, Parquet shards,
and training batches."""
