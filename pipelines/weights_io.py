"""Trained weights on disk: safetensors files with their configuration in the file's own metadata.

One file carries everything needed to rebuild the model (architecture options, parameter normalisation, the
sequence it was trained for), so a site pointing ``--set weights=/path/site.safetensors`` at its own training
run needs nothing else. Shipped weights live in ``pipelines/weights/`` next to a model card of the same name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
_META_KEY = "recon_node"


def save_weights(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any], half: bool = False) -> Path:
    """Write ``tensors`` (fp16 when ``half``: shipped weights stay a few MB) with JSON ``meta``; atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if half and t.is_floating_point():
            t = t.half()
        out[name] = t
    meta = {**meta, "stored_dtype": "float16" if half else "float32"}
    tmp = path.with_name(path.name + ".tmp")
    save_file(out, str(tmp), metadata={_META_KEY: json.dumps(meta, sort_keys=True)})
    tmp.chmod(0o644)  # safetensors writes 0600; a node running as another user must read shipped weights
    tmp.replace(path)
    return path


def load_weights(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (floating point as float32) and the metadata stored by :func:`save_weights`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    meta = weights_metadata(path)
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors weights file: {e}") from e
    tensors = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    return tensors, meta


def weights_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored by :func:`save_weights`, without reading the tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw_meta = (f.metadata() or {}).get(_META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors weights file: {e}") from e
    if raw_meta is None:
        raise ValueError(f"{path} carries no recon-node metadata (was it written by save_weights?)")
    meta: dict[str, Any] = json.loads(raw_meta)
    return meta


def shipped_weights(name: str) -> Path:
    """The path of a shipped weights file ``pipelines/weights/<name>.safetensors``."""
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        have = sorted(p.stem for p in WEIGHTS_DIR.glob("*.safetensors"))
        raise FileNotFoundError(
            f"no shipped weights named {name!r} in {WEIGHTS_DIR} (available: {', '.join(have) or 'none'})"
        )
    return path


def resolve_weights(path_or_empty: str, default_name: str) -> Path:
    """A pipeline's ``weights`` parameter: a site's own file when given, else the shipped default."""
    return Path(path_or_empty).expanduser() if path_or_empty else shipped_weights(default_name)
