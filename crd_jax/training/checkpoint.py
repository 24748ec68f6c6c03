"""Stage checkpoints (Orbax): inside a stage, :class:`StageCheckpointer` keeps the latest ``keep``
checkpoints of ``{params, opt_state, step}`` under ``<stage>/ckpt/<step>``. Orbax writes each one to a
temporary folder and renames it when complete, so a killed run never leaves a checkpoint that looks finished.
A finished stage is exported as a model folder (:mod:`crd_jax.model_io`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp


class StageCheckpointer:
    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self.manager.wait_until_finished()

    def restore(self, step: int, like: Dict[str, Any], sharding: Optional[jax.sharding.Sharding] = None) -> Dict[str, Any]:
        """Restores onto ``sharding`` (e.g. replicated over the mesh) with the structure of ``like``."""
        abstract = jax.tree_util.tree_map(
            lambda x: jax.ShapeDtypeStruct(
                np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype, sharding=sharding
            ),
            like,
        )
        return self.manager.restore(step, args=ocp.args.StandardRestore(abstract))

    def restore_latest(
        self, like: Dict[str, Any], sharding: Optional[jax.sharding.Sharding] = None, warn: Optional[Callable[[str], None]] = None
    ) -> Tuple[int, Optional[Dict[str, Any]]]:
        """``(step, state)`` of the newest checkpoint that restores, ``(0, None)`` when there is none. A damaged
        newest checkpoint (a disk error, a copy cut short) is moved aside to ``<ckpt>/../ckpt_damaged/<step>``
        with one warning line (``warn``), and the one before it is tried."""
        import shutil
        import time

        from crd_jax.errors import InputError

        steps = sorted(self.manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            try:
                return step, self.restore(step, like, sharding)
            except Exception as exc:  # Orbax and tensorstore raise many types for damaged files
                reason = f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"
                older = steps[i + 1] if i + 1 < len(steps) else None
                aside = self.directory.parent / "ckpt_damaged" / f"{step}-{int(time.time())}"
                try:
                    aside.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(self.directory / str(step)), str(aside))
                except OSError as move_error:
                    raise InputError(
                        self.directory / str(step),
                        f"checkpoint is damaged ({reason}) and cannot be moved aside ({move_error.strerror})",
                    ) from None
                message = f"warning: checkpoint {self.directory / str(step)} is damaged ({reason}); moved to {aside}, " + (
                    f"resuming from step {older}" if older is not None else "starting the stage again"
                )
                (warn or print)(message)
                self.manager.reload()
        return 0, None

    def close(self) -> None:
        self.manager.close()
