"""The OpenMP wait policy is set before torch loads (pipelines/__init__.py says why), and a site's own wins."""

from __future__ import annotations

import os
import subprocess
import sys

PROBE = (
    "import sys, os; import node.cli; "
    "print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)"
)


def _probe(env: dict[str, str]) -> str:
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout


def test_passive_wait_policy_is_the_default():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    assert _probe(env).split()[0] == "PASSIVE"


def test_a_sites_own_policy_wins():
    env = {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}
    assert _probe(env).split()[0] == "ACTIVE"
