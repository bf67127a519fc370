"""recon-node's service: ingest, routing, jobs, egress and the operator console."""

import pipelines  # noqa: F401  (first: it sets the OpenMP wait policy before torch loads)
