"""What one trial is given (nanoGPT's ``GPTConfig`` habit: configuration as a commented
dataclass): the arm it trains, its learning rate, batch size and seed, and the study-wide
settings a trial needs. ``Spec.trial_config`` builds it; the trial never reads the spec.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from study.spec import DatasetSpec
    from study.spec_sections import StopSpec
    from study.variance import ProbeSettings


@dataclass(frozen=True)
class TrialConfig:
    arm: str                          # "<model>/<family>/<variant>[options]": the grid's row
    model: str                        # mlp | cnn | resnet8 | resnet20 | resnet32
    family: str                       # an optimizer family (study.optim.FAMILIES)
    variant: str                      # one of the family's variants
    lr: float
    batch_size: int
    seed: int                         # weights, sampling, measurement: all derive from it
    epochs: int
    dataset: DatasetSpec              # what to load (the same for every trial of a study)
    measure: ProbeSettings | None     # the variance probe's schedule; None = no probe
    model_options: dict[str, Any] = field(default_factory=dict)   # widths, channels, norm
    options: dict[str, Any] = field(default_factory=dict)         # the family's options
    plugins: tuple[str, ...] = ()     # modules / files registering extra families
    threads: int = 1                  # torch threads: the CPUs the trial was given
    gpu: float = 0.0                  # the GPU fraction it was given (> 0: train on CUDA)
    stop: StopSpec | None = None      # end at the first epoch that reaches this target
    checkpoint_every_s: float = 0.0   # seconds between checkpoints (0 = every epoch)
    eval_every: int = 1               # epochs between evaluations (the last always evaluates)
    eval_train_examples: int | None = None   # training metrics over this fixed sample (None: all)

    def params(self) -> dict[str, Any]:
        """Flat parameters for the trial's MLflow run (options as ``opt.*``, model options
        as ``model.*``)."""
        out = {"arm": self.arm, "model": self.model, "family": self.family,
               "variant": self.variant, "lr": self.lr, "batch_size": self.batch_size,
               "seed": self.seed, "epochs": self.epochs, "dataset": self.dataset.name}
        out.update({f"opt.{k}": v for k, v in self.options.items()})
        out.update({f"model.{k}": v for k, v in self.model_options.items()})
        if self.eval_train_examples is not None:
            out["eval.train_examples"] = self.eval_train_examples
        return out
