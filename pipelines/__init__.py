"""recon-node's reconstruction and mapping library (never imports ``node``)."""

import os

# Before anything loads torch's OpenMP runtime, which reads this once: with the default (active) wait policy, idle
# OpenMP threads spin, and a second process on the same cores (a dictionary build beside a job, a test beside a
# benchmark) slowed EPG 35x here (fingerprint_images at 64²: 6 s alone, 215 s beside another job; 6 s again with
# PASSIVE). A site's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
