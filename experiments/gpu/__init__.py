"""The GPU-scale MSA experiment (see `driver`)."""
