"""The raw MRF pipeline: raw k-space -> subspace reconstruction -> maps."""
