"""Training metrics: rows appended to metrics.csv and a loss-curve PNG beside it."""
from __future__ import annotations

import csv
import os

FIELDS = ("step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s", "skipped")


class Metrics:
    def __init__(self, out_dir: str):
        self.path = os.path.join(out_dir, "metrics.csv")

    def append(self, **row) -> None:
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in FIELDS})

    def truncate_after(self, step: int) -> None:
        """Drops rows past `step`, so a resumed run's log does not repeat steps."""
        if not os.path.exists(self.path):
            return
        with open(self.path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=FIELDS)
            w.writeheader()
            w.writerows({k: r.get(k, "") for k in FIELDS} for r in rows)

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path, newline="") as f:
            rows = list(csv.DictReader(f))
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
