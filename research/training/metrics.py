"""Metric sinks: a CSV file and TensorBoard event files (tensorboardX); ``NullWriter``
for the processes of a multi-process run other than process 0."""

from __future__ import annotations

import csv
import os


class MetricWriter:
    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        self.path = os.path.join(logdir, "metrics.csv")
        self._rows = []
        self._fields: list[str] = []
        if os.path.isfile(self.path):  # resuming: keep earlier rows
            with open(self.path) as f:
                reader = csv.DictReader(f)
                self._fields = list(reader.fieldnames or [])
                self._rows = list(reader)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(logdir)

    def write(self, step: int, metrics: dict) -> None:
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        for k, v in row.items():
            if k != "step":
                self._tb.add_scalar(k, v, step)
        new = [k for k in row if k not in self._fields]
        self._rows.append(row)
        if new:
            self._fields += new
        with open(self.path + ".tmp", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self._fields)
            w.writeheader()
            w.writerows(self._rows)
        os.replace(self.path + ".tmp", self.path)

    def close(self) -> None:
        self._tb.close()


class NullWriter:
    """Takes metrics and writes nothing."""

    def write(self, step: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass
