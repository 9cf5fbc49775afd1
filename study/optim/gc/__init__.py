"""Gradient clustering: the family (``family.py``), its per-example distances to rank-1
centers (``distance.py``) and its stratified sampler (``stratified.py``). Importing the
package registers the family."""
from study.optim.gc.family import GC, GCOptions

__all__ = ["GC", "GCOptions"]
