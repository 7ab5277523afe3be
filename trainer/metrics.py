"""Where metrics go: DIR/metrics.jsonl (one JSON object per logged step), TensorBoard events
(DIR/tensorboard), a rich progress bar when a person watches, and the PostTrainJob's status
(``posttrain.progress.ProgressReporter``) in a cluster. Only rank 0 writes; others get a no-op.

On resume from step N, lines for steps after N (logged before a crash, then redone) are dropped,
so metrics.jsonl reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

from posttrain.trainer import storage

METRICS_FILE = "metrics.jsonl"


def _number(value: Any) -> float | None:
    """JSON has no NaN/inf: a non-finite figure is written as null."""
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


# Metrics that time this host's wall clock: they differ between two runs of the same job (a
# resumed run and an uninterrupted one agree on every other metric).
TIMING = frozenset(
    {
        "tokens_per_second",
        "step_seconds",
        "generation_tokens_per_second",
        "train_tokens_per_second",
        # async RL (trainer/async_rl)
        "rollout_tokens_per_second",
        "trainer_wait_seconds",
        "weight_publish_seconds",
        "weight_sync_seconds",
    }
)


class MetricsWriter:
    def __init__(
        self,
        output_dir: str,
        *,
        total_steps: int,
        start_step: int,
        enabled: bool = True,
        progress_bar: bool | None = None,
        reporter: Any = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = storage.join(output_dir, METRICS_FILE)
        self._remote = storage.is_gcs(output_dir)
        self._lines: list[str] = []
        self._tb = None
        self._bar = None
        self._reporter = reporter
        # async RL: step -> status.rollout (the rollout service's ``status``)
        self.rollout_status: Callable[[int], dict[str, Any]] | None = None
        if not enabled:
            return
        if storage.exists(self.path):  # resume: keep what the restored checkpoint covers
            # (nothing on a fresh start: its step-0 baseline evaluation is logged again)
            kept = [
                line
                for line in storage.read_text(self.path).splitlines()
                if start_step and line.strip() and json.loads(line).get("step", 0) <= start_step
            ]
            self._lines = [line + "\n" for line in kept]
            self._flush_all()
        if not self._remote:
            from tensorboardX import SummaryWriter

            # purge_step drops events a crashed run logged past the checkpoint.
            self._tb = SummaryWriter(
                os.path.join(output_dir, "tensorboard"),
                purge_step=start_step + 1 if start_step else 0,
            )
        if progress_bar if progress_bar is not None else sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                transient=False,
            )
            self._task = self._bar.add_task(
                "train", total=total_steps, completed=start_step, info=""
            )
            self._bar.start()

    def _flush_all(self) -> None:
        storage.write_text(self.path, "".join(self._lines))

    def log(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Write one record for ``step`` (1-based count of finished optimizer steps)."""
        record: dict[str, Any] = {"step": step}
        record.update({k: _number(v) for k, v in metrics.items()})
        if not self.enabled:
            return record
        line = json.dumps(record) + "\n"
        self._lines.append(line)
        if self._remote:
            self._flush_all()
        else:
            with open(self.path, "a") as f:
                f.write(line)
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and v is not None:
                    self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._reporter is not None:
            values = {k: v for k, v in record.items() if k != "step" and v is not None}
            if self.rollout_status is None:
                self._reporter.report(step, self.total_steps, values)
            else:  # async RL: status.rollout too
                self._reporter.report(
                    step, self.total_steps, values, rollout=self.rollout_status(step)
                )
        return record

    def advance(self, step: int, info: str = "") -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
        if self._tb is not None:
            self._tb.close()
