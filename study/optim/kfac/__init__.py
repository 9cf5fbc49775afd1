"""K-FAC: the family (``family.py``) and its Kronecker factors and eigenbasis preconditioner
(``factors.py``). Importing the package registers the family."""
from study.optim.kfac.family import KFAC, KFACOptions, kfac_layers

__all__ = ["KFAC", "KFACOptions", "kfac_layers"]
