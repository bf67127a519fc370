"""Send an ISMRMRD file to an MRD server as a scanner would (``recon-node submit``).

The sending itself is ``pipelines.sim.mrd_writer.send_study`` (config, header, acquisitions, CLOSE; replies read
concurrently); this module turns the replies into an outcome for people and scripts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SubmitResult:
    texts: list[str] = field(default_factory=list)
    n_images: int = 0
    job_id: str | None = None
    state: str = ""  # queued, done, unrouted, error

    @property
    def exit_code(self) -> int:
        return {"queued": 0, "done": 0, "unrouted": 3}.get(self.state, 1)


def interpret(replies: list[Any]) -> SubmitResult:
    import ismrmrd

    res = SubmitResult()
    for obj in replies:
        if isinstance(obj, ismrmrd.Image):
            res.n_images += 1
        elif isinstance(obj, str):
            res.texts.append(obj)
    for t in res.texts:
        if t.startswith("ERR"):
            res.state = "error"
            return res
        words = t.split()
        if len(words) >= 3 and words[0] == "job":
            res.job_id, res.state = words[1], words[2].rstrip(":")
    if not res.state:
        res.state = "error"
        res.texts.append("ERR the server closed the connection without saying what it did with the data")
    return res


def submit_file(path: str | Path, host: str, port: int, config_name: str | None = "default",
                timeout: float = 60.0) -> SubmitResult:
    from pipelines.sim.mrd_writer import send_study

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file (give an ISMRMRD .h5 file)")
    return interpret(send_study(path, host, port, config=config_name, timeout=timeout))
