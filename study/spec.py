"""A study spec: YAML -> a validated ``Spec`` -> the list of trial configurations.

Everything a user can get wrong is caught here, before Ray or MLflow start: unknown keys,
wrong types, non-positive learning rates, empty grids, unknown families / variants /
options / datasets / models, batch sizes larger than the training set, GPU fractions above
one, unknown metrics, more trials than ``search.max_trials``. Every line of a ``SpecError`` is
one problem: ``<file>: <dotted field>: <message> (got <value>)``.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from pydantic import (
    Field,
    PositiveInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from study import contract
from study.config import TrialConfig
from study.optim.options import OptionError, parse_options
from study.plugins import import_plugin
from study.plugins import resolve as resolve_plugin
from study.spec_claims import ClaimSpec
from study.spec_sections import (  # DatasetSpec is re-exported: callers import it from here
    INPUT_SHAPES,
    CheckpointSpec,
    DatasetSpec,
    EvaluateSpec,
    FamilySpec,
    LRGrid,
    MeasureSpec,
    ModelSpec,
    ResourcesSpec,
    SchedulerSpec,
    SearchSpec,
    StopSpec,
    Strict,
    TrackingSpec,
    grid_size,
    grid_values,
)
from study.spec_values import (  # SpecError is re-exported: callers import it from here
    Problem,
    SpecError,
    check_name,
    format_errors,
    model_label,
    parse_lr,
    read_yaml,
    shown,
)


class Spec(Strict):
    name: str                                # a folder name: results/<name>, reports/<name>
    dataset: DatasetSpec
    models: list[ModelSpec] = Field(min_length=1)
    epochs: PositiveInt
    seeds: list[int] = Field([0], min_length=1)
    lr: LRGrid | None = None                 # optional when every family sets its own lr
    batch_size: list[PositiveInt] = Field(min_length=1)
    families: dict[str, FamilySpec | None] = Field(min_length=1)
    search: SearchSpec = SearchSpec()
    scheduler: SchedulerSpec = SchedulerSpec()
    stop: StopSpec | None = None             # end a trial once it reaches a target
    resources: ResourcesSpec = ResourcesSpec()
    checkpoint: CheckpointSpec = CheckpointSpec()
    evaluate: EvaluateSpec = EvaluateSpec()
    measure: MeasureSpec = MeasureSpec()
    tracking: TrackingSpec = TrackingSpec()
    storage: str = "results"
    max_failures: int = Field(2, ge=0)
    plugins: list[str] = []                  # extra modules registering optimizer families
    claims: list[ClaimSpec] = []             # what the study should show (analysis/claims.py)

    @model_validator(mode="before")
    @classmethod
    def _import_plugins(cls, raw, info: ValidationInfo):
        """Plugins register their families before ``families`` is validated; a plugin given
        as a ``.py`` file is kept as an absolute path (relative to the spec's folder)."""
        plugins = raw.get("plugins") if isinstance(raw, dict) else None
        if not isinstance(plugins, list):
            return raw
        base = (info.context or {}).get("base")
        resolved = [resolve_plugin(p, base) if isinstance(p, str) else p for p in plugins]
        for entry in resolved:
            if not isinstance(entry, str):
                continue                     # the field's own validation names the type
            try:
                import_plugin(entry)
            except Exception as err:         # any failure to import is the spec's problem
                raise Problem(f"cannot import {entry!r} ({type(err).__name__}: {err})",
                              "plugins") from None
        return {**raw, "plugins": resolved}

    _name = field_validator("name")(classmethod(lambda cls, v: check_name(v)))
    _lr = field_validator("lr", mode="before")(classmethod(lambda cls, v: parse_lr(v)))

    @model_validator(mode="after")
    def _metric_exists(self):
        if (self.search.metric in contract.VALIDATION_METRICS
                and self.dataset.val_fraction == 0):
            raise Problem(f"needs a validation split, but dataset.val_fraction is 0 "
                          f"(got {self.search.metric!r})", "search.metric")
        return self

    @model_validator(mode="after")
    def _selection_is_logged(self):
        """search.select must name a split the study has and an epoch that is evaluated."""
        select = self.search.select
        if select is None:
            return self
        if select.metric in contract.VALIDATION_METRICS and self.dataset.val_fraction == 0:
            raise Problem(f"needs a validation split, but dataset.val_fraction is 0 (got "
                          f"{select.metric!r})", "search.select.metric")
        epoch, every = select.epoch, self.evaluate.every
        if epoch is not None and epoch > self.epochs:
            raise Problem(f"after the last epoch ({self.epochs}) (got {epoch})",
                          "search.select.epoch")
        if epoch is not None and epoch % every and epoch != self.epochs:
            raise Problem(f"not an evaluated epoch: evaluate.every is {every}, so the metric "
                          f"is logged at epochs {every}, {2 * every}, ... and {self.epochs} "
                          f"(got {epoch})", "search.select.epoch")
        return self

    @model_validator(mode="after")
    def _lr_for_every_family(self):
        if self.lr is None:
            for name, fam in self.families.items():
                if fam.lr is None:
                    raise Problem(f"no learning rates for family {name}: set lr at the top "
                                  f"level or families.{name}.lr", f"families.{name}.lr")
        return self

    @field_validator("families")
    @classmethod
    def _families(cls, fams):
        from study.optim import FAMILIES

        out = {}
        for name, fam in fams.items():
            if name not in FAMILIES:
                raise Problem(f"unknown optimizer family {name!r}; known: {sorted(FAMILIES)}")
            fam = fam or FamilySpec()
            cls_ = FAMILIES[name]
            for v in fam.variants or []:
                if v not in cls_.variants:
                    raise Problem(f"unknown variant {v!r}; choose from {list(cls_.variants)}",
                                  f"{name}.variants")
            for key, value in fam.options.items():
                values = value if isinstance(value, list) else [value]
                if not values:
                    raise Problem("an empty list of values (got [])", f"{name}.options.{key}")
                for variant in fam.variants or cls_.variants[:1]:
                    for v in values:     # each value alone: combinations are built below
                        _check_options(cls_, variant, {key: v})
            out[name] = fam
        return out

    @model_validator(mode="after")
    def _claims_name_this_study(self):
        """A claim's names (families, models, dataset) are this study's; its name is unique."""
        names = {"family": set(self.families), "baseline": set(self.families),
                 "model": {m.name for m in self.models}, "dataset": {self.dataset.name}}
        seen = set()
        for i, claim in enumerate(self.claims):
            if claim.name in seen:
                raise Problem(f"a second claim of that name (got {claim.name!r})",
                              f"claims.{i}.name")
            seen.add(claim.name)
            for key, known in names.items():
                value = claim.params.get(key)
                if value is not None and value not in known:
                    raise Problem(f"no {key} {value!r} in this study; it has "
                                  f"{', '.join(sorted(known))}", f"claims.{i}.params.{key}")
            required, optional = contract.CLAIM_STATISTICS[claim.statistic]
            tuned = "family" in required          # picks a family's tuned setting on one model
            if tuned and "model" in optional and "model" not in claim.params and len(
                    names["model"]) > 1:
                raise Problem(f"the study has models {', '.join(sorted(names['model']))}: "
                              "name one", f"claims.{i}.params.model")
        return self

    @model_validator(mode="after")
    def _batch_fits(self):
        n = self.dataset.train_size()
        for b in self.batch_size:
            if b > n:
                raise Problem(f"larger than the training set ({n:,} examples of "
                              f"{self.dataset.name} after the validation split) (got {b})",
                              "batch_size")
        return self

    @model_validator(mode="after")
    def _trial_limit(self):
        """Counted, never listed, and before ``_arms_build`` (which builds a model per arm)."""
        limit, field = self.search.max_trials, "search.max_trials"
        above = f"above the limit of {limit:,} (raise search.max_trials to run it)"
        if self.search.kind == "grid":
            if self.num_trials() > limit:
                raise Problem(f"the grid has {self.num_trials():,} trials, {above}", field)
            return self
        if self.search.num_samples > limit:
            raise Problem(f"search.num_samples asks for {self.search.num_samples:,} trials, "
                          f"{above}", field)
        if self.num_arms() > limit:          # Optuna's choices, each built by _arms_build
            raise Problem(f"the search space has {self.num_arms():,} arms (models × "
                          f"variants × option combinations), {above}", field)
        for name in self.families:
            if grid_size(self._lr_of(name)) > limit:
                raise Problem(f"family {name} has {grid_size(self._lr_of(name)):,} "
                              f"learning rates, {above}", field)
        return self

    @model_validator(mode="after")
    def _arms_build(self):
        """Build every arm's model and optimizer once (no data, no training), so option
        values only a family can judge (``snapshot_unit: weeks``) fail here, not in a trial."""
        import torch

        from study.models import build_model
        from study.optim import make_optimizer

        for arm in self.arms():
            try:
                model = build_model(arm["model"], INPUT_SHAPES[self.dataset.name], 10,
                                    **arm["model_options"])
            except ValueError as err:
                raise Problem(f"{err} (got {arm['model']} with {arm['model_options']})",
                              "models") from None
            try:
                make_optimizer(arm["family"], model, torch.nn.functional.cross_entropy,
                               min(self.lr_grid(arm["family"])), arm["variant"], **arm["options"])
            except OptionError as err:       # a combination of values (nesterov + momentum 0)
                raise Problem(f"{err.message} (got {shown(err.value)} with variant "
                              f"{arm['variant']!r}, options {arm['options']})",
                              f"families.{err.family}.options.{err.field}") from None
            except (ValueError, TypeError) as err:
                raise Problem(f"{err} (got variant {arm['variant']!r}, options "
                              f"{arm['options']})", f"families.{arm['family']}") from None
        return self

    # -- derived ------------------------------------------------------------------------------
    def _lr_of(self, family: str) -> LRGrid:
        fam = self.families[family]
        return fam.lr if fam and fam.lr is not None else self.lr

    def lr_grid(self, family: str) -> list[float]:
        return grid_values(self._lr_of(family))

    def arms(self) -> list[dict[str, Any]]:
        """Every (model, family, variant, options) combination, with a readable label."""
        from study.optim import FAMILIES

        arms = []
        for model in self.models:
            for name, fam in self.families.items():
                grids = {k: v if isinstance(v, list) else [v] for k, v in fam.options.items()}
                varying = [k for k, v in grids.items() if len(v) > 1]
                for variant in fam.variants or [FAMILIES[name].variants[0]]:
                    for combo in itertools.product(*grids.values()):
                        options = dict(zip(grids, combo))
                        label = f"{model_label(model, self.models)}/{name}/{variant}"
                        if varying:
                            label += "[" + ",".join(f"{k}={options[k]}" for k in varying) + "]"
                        arms.append({"arm": label, "model": model.name,
                                     "model_options": model.options(), "family": name,
                                     "variant": variant, "options": options})
        return arms

    def trial_config(self, point: dict[str, Any]) -> TrialConfig:
        """A trial of this study from one point of its search (an arm + lr, batch size,
        seed: an entry of ``trials()``, or an Optuna sample resolved to that shape)."""
        return TrialConfig(
            arm=point["arm"], model=point["model"], family=point["family"],
            variant=point["variant"], lr=float(point["lr"]),
            batch_size=int(point["batch_size"]), seed=int(point["seed"]), epochs=self.epochs,
            dataset=self.dataset, measure=self.measure.settings(),
            model_options=dict(point.get("model_options", {})),
            options=dict(point.get("options", {})), plugins=tuple(self.plugins),
            threads=max(1, int(self.resources.cpu)), gpu=self.resources.gpu, stop=self.stop,
            checkpoint_every_s=self.checkpoint.every_s, eval_every=self.evaluate.every,
            eval_train_examples=self.evaluate.train_examples)

    def trials(self) -> list[dict[str, Any]]:
        """The full grid: arms × lr (per family) × batch size × seed."""
        return [{**arm, "lr": lr, "batch_size": bs, "seed": seed}
                for arm in self.arms() for lr in self.lr_grid(arm["family"])
                for bs in self.batch_size for seed in self.seeds]

    def num_arms(self) -> int:
        """``len(self.arms())``, counted."""
        return len(self.models) * sum(fam.num_arms() for fam in self.families.values())

    def num_trials(self) -> int:
        """``len(self.trials())`` for a grid (counted, never listed); Optuna's num_samples."""
        if self.search.kind != "grid":
            return self.search.num_samples
        per_model = sum(fam.num_arms() * grid_size(self._lr_of(name))
                        for name, fam in self.families.items())
        return len(self.models) * per_model * len(self.batch_size) * len(self.seeds)


def _check_options(family_cls, variant: str, options: dict[str, Any]) -> None:
    """A family's typed options (``study.optim.options``); a problem names
    ``<family>.options.<key>`` and the value."""
    try:
        parse_options(family_cls.Options, family_cls.family, variant, options)
    except OptionError as err:
        raise Problem(f"{err.message} (got {shown(err.value)})",
                      f"{err.family}.options.{err.field}") from None


# -- loading ---------------------------------------------------------------------------------

def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file; every problem (a missing file, a folder, binary bytes,
    YAML syntax, a bad value) is a ``SpecError`` naming the file."""
    path = Path(path)
    return parse_spec(read_yaml(path), source=str(path), base=path.resolve().parent)


def parse_spec(raw: Any, source: str = "<spec>", base: Path | None = None) -> Spec:
    """Validate a spec mapping; ``base`` is the folder relative plugin files are in (the
    spec file's folder; the working folder when None)."""
    if raw is None:
        raise SpecError(f"{source}: a spec is a mapping of fields, got an empty document")
    if not isinstance(raw, dict):
        raise SpecError(f"{source}: a spec is a mapping of fields, got {type(raw).__name__}")
    try:
        return Spec.model_validate(raw, context={"base": base})
    except ValidationError as err:
        raise SpecError(_format(err, source)) from None


def _format(err: ValidationError, source: str = "<spec>") -> str:
    """One line per problem: ``<source>: <dotted field>: <message> (got <value>)``."""
    return format_errors(err, source)
