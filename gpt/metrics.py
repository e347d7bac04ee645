"""Training metrics: rows appended to metrics.csv and a loss-curve PNG beside it."""
from __future__ import annotations

import csv
import os

FIELDS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", "skipped")


class Metrics:
    """The log and plot are for reading along: a failed write (a full disk) warns once and
    training goes on, as the checkpoints, written separately, are what must not be lost."""

    def __init__(self, out_dir: str, warn=print):
        self.path = os.path.join(out_dir, "metrics.csv")
        self.warn, self.warned = warn, False

    def _failed(self, what: str, e: Exception) -> None:
        if not self.warned:
            self.warned = True
            reason = getattr(e, "strerror", None) or e
            self.warn(f"warning: could not write {what} ({reason}); training goes on, checkpoints are saved apart")

    def _rows(self) -> list[dict]:
        """The rows that parse: a damaged line (the NUL-filled tail a power loss can leave) is dropped.
        Each NUL is read as U+FFFD, which no number parses through: Python 3.10's csv module
        refuses a NUL ("line contains NUL"), 3.11's keeps it in the field."""
        with open(self.path, newline="") as f:
            return [r for r in csv.DictReader(line.replace("\0", "\ufffd") for line in f) if _parses(r)]

    def append(self, **row) -> None:
        new = not os.path.exists(self.path)
        try:
            with open(self.path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                if new:
                    w.writeheader()
                w.writerow({k: row.get(k, "") for k in FIELDS})
        except OSError as e:
            self._failed(self.path, e)

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`, so a resumed run's log does not repeat steps."""
        if not os.path.exists(self.path):
            return
        try:
            rows = [r for r in self._rows() if int(r["step"]) <= step]
            with open(self.path, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)
        except (OSError, csv.Error) as e:
            self._failed(self.path, e)

    def plot(self) -> None:
        try:
            self._plot()
        except (OSError, csv.Error) as e:
            self._failed(os.path.join(os.path.dirname(self.path), "loss.png"), e)

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self._rows()
        fig, ax = plt.subplots(figsize=(7, 4))
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
            if pts:
                ax.plot(*zip(*pts), style, label=key.replace("_", " "), markersize=3)
        ax.set(xlabel="step", ylabel="loss", title="training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(self.path), "loss.png"), dpi=100)
        plt.close(fig)


def _parses(row: dict) -> bool:
    try:
        int(row["step"])
        for key in ("train_loss", "val_loss"):
            if row.get(key):
                float(row[key])
        return True
    except (KeyError, TypeError, ValueError):
        return False
