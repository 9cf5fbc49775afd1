"""Per-example gradient statistics (sum, elementwise second moment, per-example norms) in
one forward and one backward pass; see ``stats.py``."""
from study.grads.stats import BatchStats, batch_stats

__all__ = ["BatchStats", "batch_stats"]
