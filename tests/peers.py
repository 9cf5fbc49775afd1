"""The peers of ``study.grads.batch_stats`` as oracles (tests) and as benchmark columns
(``bench/per_example.py``): torch.func, BackPACK and Opacus, each asked for the same three
quantities — the sum, the elementwise second moment and the per-example squared norms of
the per-example gradients of loss_n — plus the models outside the main test suite that the
issue measured them on (an Embedding + LayerNorm text model, a reflect-padded conv net, a
``nn.Bilinear`` model, the MNIST-1D CNN).

Each peer is ``prepare(model) -> run(x, y) -> (sums, sum_sqs, norms_sq)`` so that the
benchmark times only ``run``; ``prepare`` raises ``Unsupported`` (or the peer's own
error, which ``run_peer`` turns into ``Unsupported``) where the peer has no rule for a
layer. Parameters come in ``model.parameters()`` order. BackPACK and Opacus work on a copy
of the model (both leave hooks on the model they are given).
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from study.models import CNN1d


class Unsupported(Exception):
    """The peer has no rule for some layer of the model."""


def ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none")


def _from_per_example(per: list[torch.Tensor]):
    flat = [g.reshape(g.shape[0], -1) for g in per]
    return ([g.sum(0) for g in per], [(g * g).sum(0) for g in per],
            sum((f * f).sum(1) for f in flat))


def torch_func(model: nn.Module):
    """``vmap(grad(...))`` over the whole model: every per-example gradient materialized."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def one_loss(params, xi, yi):
        return ce(functional_call(model, dict(zip(names, params)), (xi[None],)), yi[None]).sum()

    per_example = vmap(grad(one_loss), in_dims=(None, 0, 0))

    def run(x, y):
        params = tuple(p.detach() for p in model.parameters() if p.requires_grad)
        return _from_per_example(list(per_example(params, x, y)))
    return run


def backpack(model: nn.Module):
    """BackPACK's cheapest route to the three quantities: the gradient (the sum),
    ``SumGradSquared`` (second moment) and ``BatchL2Grad`` (per-parameter squared norms),
    on a ``reduction='sum'`` loss so that nothing is rescaled."""
    bp = _import("backpack")
    from backpack.extensions import BatchL2Grad, SumGradSquared

    try:
        model = bp.extend(copy.deepcopy(model))     # BackPACK hooks the model it extends
    except NotImplementedError as e:
        raise Unsupported(str(e)) from e
    loss_fn = bp.extend(nn.CrossEntropyLoss(reduction="sum"))
    params = [p for p in model.parameters() if p.requires_grad]

    def run(x, y):
        for p in params:
            p.grad = None
        with bp.backpack(SumGradSquared(), BatchL2Grad()):
            loss_fn(model(x), y).backward()
        for p in params:
            if not hasattr(p, "sum_grad_squared") or not hasattr(p, "batch_l2"):
                raise Unsupported("no BackPACK extension for a layer with parameters")
        out = ([p.grad for p in params], [p.sum_grad_squared for p in params],
               sum(p.batch_l2 for p in params))
        for p in params:
            p.grad = None
            del p.sum_grad_squared, p.batch_l2
        return out
    return run


def opacus(model: nn.Module):
    """Opacus ``GradSampleModule`` (hooks; functorch for layers without a rule): per-example
    gradients in ``p.grad_sample``, then the three reductions."""
    gsm_mod = _import("opacus.grad_sample")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = copy.deepcopy(model)              # Opacus hooks the model it wraps
            wrapped = gsm_mod.GradSampleModule(model, loss_reduction="sum")
        except NotImplementedError as e:
            raise Unsupported(str(e)) from e
    params = [p for p in model.parameters() if p.requires_grad]

    def run(x, y):
        for p in params:
            p.grad, p.grad_sample = None, None
        ce(wrapped(x), y).sum().backward()
        out = _from_per_example([p.grad_sample for p in params])
        for p in params:
            p.grad, p.grad_sample = None, None
        return out
    return run


PEERS = {"torch.func": torch_func, "backpack": backpack, "opacus": opacus}


def _import(name: str):
    """Import a peer, or raise ``Unsupported`` when it is not installed."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Unsupported(f"{name} is not installed") from e


def run_peer(peer: str, model: nn.Module, x, y):
    """The peer's (sums, sum_sqs, norms_sq), or ``Unsupported`` with the peer's reason."""
    try:
        return PEERS[peer](model)(x, y)
    except Unsupported:
        raise
    except (NotImplementedError, RuntimeError, TypeError, ValueError, AttributeError) as e:
        raise Unsupported(f"{type(e).__name__}: {e}") from e


# ---- models outside the main test suite ------------------------------------------------

class TextModel(nn.Module):
    """Token ids (B, T) -> Embedding -> LayerNorm -> Linear + tanh -> mean over T -> classes."""

    def __init__(self, vocab=1000, dim=64, classes=10):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.mix(self.norm(self.embed(x)))).mean(1))


def reflect_conv(channels=(16, 32), classes=10):
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1, padding_mode="reflect"), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c2, classes))


class BilinearModel(nn.Module):
    """(B, 2·d) -> Bilinear(first half, second half) -> tanh -> classes: a module whose
    forward takes two tensors."""

    def __init__(self, d=20, hidden=32, classes=10):
        super().__init__()
        self.d = d
        self.bil = nn.Bilinear(d, d, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.out(torch.tanh(self.bil(x[:, :self.d], x[:, self.d:])))


def extra_models(batch: int, small: bool = False):
    """name -> (make model, make (x, y)); ``small`` for the float64 tests."""
    vocab, length = (50, 6) if small else (1000, 32)

    def labels():
        return torch.randint(0, 10, (batch,))

    def floats(*shape):
        return lambda: (torch.randn(batch, *shape), labels())

    return {
        "text-emb-ln": (lambda: TextModel(vocab, 16 if small else 64),
                        lambda: (torch.randint(0, vocab, (batch, length)), labels())),
        "reflect-conv": (lambda: reflect_conv((4, 6) if small else (16, 32)),
                         floats(3, *((8, 8) if small else (32, 32)))),
        "bilinear": (lambda: BilinearModel(*((6, 8) if small else (20, 32))),
                     floats(12 if small else 40)),
        "mnist1d-cnn": (lambda: CNN1d(1, 40, [8] * 3 if small else [25] * 3, 10), floats(1, 40)),
    }
