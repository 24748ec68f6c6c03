"""What a user sees while training: a progress bar per stage, a JSONL metrics file, TensorBoard events.

Only process 0 writes; other processes get a silent logger.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, Optional

import jax


class _Bar:
    def __init__(self, name: str, start: int, total: int, enabled: bool):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, file=sys.stderr, leave=True)
        self._pos = start

    def update(self, step: int, values: Dict[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._pos)
        self._pos = step
        shown = {k: f"{v:.4g}" for k, v in values.items() if k != "steps_per_s"}
        shown["steps/s"] = f"{values.get('steps_per_s', 0):.2f}"
        self._bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


class MetricLogger:
    def __init__(self, workdir: Optional[Path], enabled: Optional[bool] = None, progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = Path(workdir) if workdir is not None else None
        self.show_progress = progress
        self._writers = {}
        self._jsonl = None
        if self.enabled and self.workdir is not None:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(self.workdir / "metrics.jsonl", "a", buffering=1)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=sys.stderr, flush=True)
            if self._jsonl is not None:
                self._jsonl.write(json.dumps({"time": time.time(), "message": message}) + "\n")

    def progress(self, name: str, start: int, total: int) -> _Bar:
        return _Bar(name, start, total, self.enabled and self.show_progress)

    def _writer(self, stage: str):
        if stage not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[stage] = SummaryWriter(str(self.workdir / "tensorboard" / stage))
        return self._writers[stage]

    def scalars(self, stage: str, step: int, values: Dict[str, float], prefix: str = "") -> None:
        if not self.enabled or self._jsonl is None:
            return
        record = {"time": time.time(), "stage": stage, "step": int(step)}
        record.update({prefix + k: float(v) for k, v in values.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        writer = self._writer(stage)
        for k, v in values.items():
            writer.add_scalar(prefix + k, float(v), int(step))
        writer.flush()

    def forget_after(self, stage: str, step: int) -> None:
        """Drops the records of ``stage`` past ``step`` (logged before a kill, after the checkpoint a resumed
        stage restarts from), so that every step appears once in ``metrics.jsonl``."""
        if not self.enabled or self._jsonl is None:
            return
        from crd_jax.data.io import atomic_path

        path = self.workdir / "metrics.jsonl"
        self._jsonl.close()
        kept = []
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a line cut by the kill
                continue
            if not (r.get("stage") == stage and int(r.get("step", -1)) > step):
                kept.append(line)
        with atomic_path(path) as tmp:
            Path(tmp).write_text("".join(k + "\n" for k in kept))
        self._jsonl = open(path, "a", buffering=1)

    def close(self) -> None:
        for w in self._writers.values():
            w.close()
        if self._jsonl is not None:
            self._jsonl.close()
