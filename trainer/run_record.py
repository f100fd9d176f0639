"""output_dir/metrics.jsonl: what a run measured, one JSON object a line, for programs that should not
parse the console (the benchmark, tests, a user's own analysis). Rank 0 writes each logged step's
scalars (under their TensorBoard tags), each validation and each committed checkpoint, as
{"kind": "step" | "eval" | "checkpoint", "step": N, ...}. A resumed run appends: a step logged twice
(once before an interruption, once after the resume) counts by its last line."""

import json
from pathlib import Path


class RunRecord:
    def __init__(self, path: Path | None):
        """None: record nothing (every rank but the first)."""
        self.file = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(path, "a")

    def write(self, kind: str, step: int, **fields) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"kind": kind, "step": step, **fields}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def read_records(path: Path, kind: str) -> dict[int, dict]:
    """The records of one kind by step (the last line of a step wins)."""
    found = {}
    for line in Path(path).read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == kind:
            found[record["step"]] = record
    return found
