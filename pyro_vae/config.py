"""Run configuration: frozen dataclasses, validated when built, saved with every run.

Defaults follow the IWAE paper's MNIST setup (Burda et al., 2016): an MLP with two
hidden layers of 200 tanh units per network, 50 latent dimensions, a Bernoulli
likelihood on dynamically binarized images. No torch import here: ``--help`` is fast.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from pyro_vae import choices
from pyro_vae.errors import UserInputError
from pyro_vae.imports import is_import_path
from pyro_vae.io import read_json
from pyro_vae.objectives.registry import estimator_key, estimator_spec, instance_options


def _choice(value: Any, choices: Iterable[str], what: str) -> None:
    if not isinstance(value, str) or value not in choices:
        raise UserInputError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


def _integer(value: Any, what: str, minimum: int, maximum: int | None = None) -> int:
    """An int (not a bool, not 2.5) in [minimum, maximum]."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserInputError(f"{what} must be an integer, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise UserInputError(f"{what} must be an integer {bound}, got {value}")
    return value


#: float32's largest finite value: every number a run uses must fit in the tensors' type
FLOAT32_MAX = 3.4028234663852886e38
#: scales (prior, Gaussian likelihood) enter the ELBO squared and inverted: outside this
#: range their squares or inverse squares overflow or vanish in float32 arithmetic
SCALE_RANGE = (1e-6, 1e6)


def _number(
    value: Any,
    what: str,
    minimum: float | None = None,
    positive: bool = False,
    maximum: float = FLOAT32_MAX,
) -> float:
    """A finite real number within float32's range (at most ``maximum`` in magnitude),
    > 0 if ``positive``, >= ``minimum`` if given."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserInputError(f"{what} must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise UserInputError(f"{what} must be > 0, got {value}")
    if minimum is not None and value < minimum:
        raise UserInputError(f"{what} must be >= {minimum}, got {value}")
    if abs(value) > maximum:
        raise UserInputError(f"{what} must be at most {maximum:g} in magnitude, got {value:g}")
    return float(value)


def _scale(value: Any, what: str) -> float:
    low, high = SCALE_RANGE
    _number(value, what, positive=True, maximum=math.inf)
    if not low <= value <= high:
        raise UserInputError(
            f"{what} must be in [{low:g}, {high:g}], got {value:g}: the ELBO squares it and "
            f"divides by its square, which overflows float32 outside that range"
        )
    return float(value)


def _integers(values: Any, what: str, allow_empty: bool = False) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise UserInputError(f"{what} must be a list of integers, got {values!r}")
    values = tuple(values)
    if not values and not allow_empty:
        raise UserInputError(f"{what} must hold at least one integer")
    return tuple(_integer(v, what, 1) for v in values)


@dataclass(frozen=True)
class ModelConfig:
    """The model: latent layers, networks, likelihood, prior; validated when built (a bad
    value raises :class:`~pyro_vae.errors.UserInputError` naming it). Each field is
    described beside it; :func:`~pyro_vae.models.build.build_vae` builds the model.

    Example::

        config = ModelConfig(latent_dims=(100, 50), guide="top-down")
    """

    latent_dims: tuple[int, ...] = (50,)  # latent size; several numbers: one per stochastic layer
    hidden: tuple[int, ...] = (200, 200)  # widths of each MLP's hidden layers (IWAE paper)
    activation: str = "tanh"  # hidden nonlinearity (IWAE paper: tanh)
    network: str = "mlp"  # "mlp", or "conv" for the small convolutional pair
    likelihood: str = "bernoulli"  # bernoulli | continuous_bernoulli | gaussian
    gaussian_scale: float | None = 1.0  # fixed scale of a Gaussian likelihood; None learns it
    prior_loc: float = 0.0  # mu_p of the N(mu_p, sigma_p^2) prior on z
    prior_scale: float = 1.0  # sigma_p of the prior
    # several layers: "bottom-up" (default: in the measured comparisons it keeps both
    # layers in use without warm-up, where top-down loses one) or "top-down" (ladder);
    # one layer has no inference order: None
    guide: str | None = None
    # your own model: the import path package.module:factory of a callable that takes the
    # data's shape (a tuple) and returns a model the protocol accepts (model and guide);
    # the settings above then do not apply
    factory: str | None = None
    factory_options: dict[str, Any] = field(default_factory=dict)  # the factory's keywords

    def __post_init__(self) -> None:
        if self.factory is not None:
            self._check_factory()
        object.__setattr__(self, "latent_dims", _integers(self.latent_dims, "latent dims"))
        object.__setattr__(self, "hidden", _integers(self.hidden, "hidden sizes", True))
        _choice(self.activation, choices.ACTIVATIONS, "activation")
        _choice(self.network, choices.NETWORKS, "network")
        _choice(self.likelihood, choices.LIKELIHOODS, "likelihood")
        if self.gaussian_scale is not None:
            _scale(self.gaussian_scale, "gaussian_scale")
        _number(self.prior_loc, "prior_loc", maximum=SCALE_RANGE[1])
        _scale(self.prior_scale, "prior_scale")
        if self.guide is not None:
            _choice(self.guide, choices.GUIDES, "guide")
        if len(self.latent_dims) == 1:
            object.__setattr__(self, "guide", None)
        elif self.guide is None:
            object.__setattr__(self, "guide", "bottom-up")

    def _check_factory(self) -> None:
        if not is_import_path(self.factory):
            raise UserInputError(
                f"model factory {self.factory!r} is not an import path: write it as "
                f"package.module:function"
            )
        if not isinstance(self.factory_options, dict):
            raise UserInputError(
                f"factory_options must be a mapping of keywords to values, got "
                f"{self.factory_options!r}"
            )
        defaults = ModelConfig()
        changed = [
            f.name
            for f in fields(self)
            if f.name not in ("factory", "factory_options", "guide")
            and getattr(self, f.name) != getattr(defaults, f.name)
        ]
        if changed:
            raise UserInputError(
                f"the model settings {', '.join(changed)} do not apply to a model factory "
                f"({self.factory}): pass what the factory needs as factory_options"
            )
        object.__setattr__(self, "factory_options", dict(self.factory_options))


@dataclass(frozen=True)
class DataConfig:
    """The data set, by name or path, and how it is binarized and split; validated when
    built. :meth:`load` loads it (:func:`~pyro_vae.data.load_data`).

    Example::

        data = DataConfig(dataset="digits", validation_size=200).load(seed=0)
    """

    # digits (built in, offline) | mnist | fashion-mnist | kmnist, or your own data: the
    # absolute path of a .npy/.npz file or a folder of images
    dataset: str = "digits"
    data_dir: str | None = None  # folder of IDX files; None: cache folder, downloading if online
    binarize: str = "dynamic"  # dynamic (fresh draw per batch) | static (fixed seed) | none
    validation_size: int = 0  # training points held out for validation / early stopping
    limit: int | None = None  # keep only this many training and test points (quick runs)

    def __post_init__(self) -> None:
        if not is_data_path(self.dataset):
            _choice(self.dataset, choices.DATASETS, "dataset")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise UserInputError(f"data_dir must be a folder name, got {self.data_dir!r}")
        _choice(self.binarize, choices.BINARIZATIONS, "binarization")
        _integer(self.validation_size, "validation_size", 0)
        if self.limit is not None:
            _integer(self.limit, "limit", 1)

    def load(self, seed: int = 0) -> Any:
        """The data set this config names (:func:`pyro_vae.data.load_data`)."""
        from pyro_vae.data import load_data

        return load_data(
            self.dataset,
            self.data_dir,
            self.binarize,
            self.validation_size,
            seed=seed,
            limit=self.limit,
        )


def is_data_path(dataset: Any) -> bool:
    """Whether ``dataset`` names your own data by path rather than a built-in set."""
    return (
        isinstance(dataset, str)
        and dataset not in choices.DATASETS
        and (dataset.endswith((".npy", ".npz")) or "/" in dataset or "\\" in dataset)
    )


@dataclass(frozen=True)
class TrainConfig:
    """How :func:`~pyro_vae.training.fit.fit` trains: estimator, optimizer, schedule,
    warm-up, early stopping, evaluation; validated when built.

    Example::

        config = TrainConfig(estimator="iwae", particles=5, epochs=20, lr_schedule="cosine")
    """

    # a name (mc: Trace_ELBO, analytic: TraceMeanField_ELBO, iwae, renyi, stl, ...), an
    # import path package.module:Name of your own (or of pyro.infer:RenyiELBO), or, from
    # Python, an Estimator or ELBO object (config.json records its class's import path)
    estimator: Any = "mc"
    particles: int = 1  # samples of z per data point and step (K)
    # the estimator's options, e.g. {"alpha": 0.3} for renyi (see its Estimator.options)
    estimator_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 10  # passes over the training set
    batch_size: int = 128  # data points per gradient step
    lr: float = 1e-3  # Adam learning rate
    optimizer: str = "adam"  # adam | clipped_adam (Pyro's ClippedAdam, gradient norm clipping)
    clip_norm: float = 10.0  # clipped_adam only: gradient entries are clipped to +/- this
    lr_schedule: str = "constant"  # constant | exponential | cosine | iwae (per epoch)
    lr_gamma: float = 0.95  # exponential schedule: learning-rate factor per epoch
    adam_epsilon: float = 1e-8  # Adam's epsilon (the IWAE paper: 1e-4)
    kl_warmup_epochs: float = 0.0  # epochs over which the KL factor rises linearly to 1
    free_bits: float = 0.0  # nats: a layer's batch-mean KL below this gets no gradient
    early_stopping_patience: int = 0  # stop after this many epochs without a better validation ELBO
    eval_particles: int = 1  # samples of z for the per-epoch test ELBO
    # K of the final log p(x) a run folder gets (pyro-vae train); fit does not evaluate it
    eval_samples: int = 5000  # (call pyro_vae.evaluate); 0: none
    eval_images: int | None = None  # test images for it, a fixed random subset; None: all
    monitor_images: int | None = 2000  # test images evaluated after each epoch; None: all
    seed: int = 0  # seeds torch, numpy, python and the data order
    device: str = "cpu"  # cpu | cuda
    compile: bool | str = "auto"  # replay steps from a captured graph; auto: if the run repays it
    # budgets inside `epochs` (compare --budget samples|seconds): stop after this many
    # gradient steps in all, or once the training steps (evaluations not counted) have
    # taken this many wall-clock seconds; None: the epochs alone decide
    max_steps: int | None = None
    max_seconds: float | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise UserInputError(f'compile must be true, false or "auto", got {self.compile!r}')
        if not isinstance(self.estimator_options, dict):
            raise UserInputError(
                f"estimator_options must be a mapping of option names to values, got "
                f"{self.estimator_options!r}"
            )
        spec = estimator_spec(self.estimator)
        if isinstance(self.estimator, str) and self.estimator != spec.key:
            object.__setattr__(self, "estimator", spec.key)
        if spec.instance is not None:  # an ELBO object carries its own settings
            self._take_instance_settings(spec)
        # only the options given are kept (a default that changes reaches old configs)
        spec.resolve_options(self.estimator_options)
        object.__setattr__(self, "estimator_options", dict(self.estimator_options))
        _choice(self.optimizer, choices.OPTIMIZERS, "optimizer")
        _choice(self.lr_schedule, choices.LR_SCHEDULES, "learning-rate schedule")
        _choice(self.device, ("cpu", "cuda"), "device")
        for name in ("particles", "epochs", "batch_size", "eval_particles"):
            _integer(getattr(self, name), name.replace("_", "-"), 1)
        _integer(self.seed, "seed", 0, 2**32 - 1)  # numpy's seeds are 32-bit
        _integer(self.early_stopping_patience, "early_stopping_patience", 0)
        if self.monitor_images is not None:
            _integer(self.monitor_images, "monitor_images", 1)
        _integer(self.eval_samples, "eval_samples", 0)
        if self.max_steps is not None:
            _integer(self.max_steps, "max_steps", 1)
        if self.max_seconds is not None:
            _number(self.max_seconds, "max_seconds", positive=True)
        if self.eval_images is not None:
            _integer(self.eval_images, "eval_images", 1)
        _number(self.lr, "learning rate", positive=True)
        _number(self.clip_norm, "clip_norm", positive=True)
        _number(self.lr_gamma, "lr_gamma", positive=True)
        _number(self.adam_epsilon, "adam_epsilon", positive=True)
        _number(self.kl_warmup_epochs, "kl_warmup_epochs", minimum=0)
        _number(self.free_bits, "free_bits", minimum=0)
        if self.free_bits and spec.key not in ("mc", "analytic"):
            raise UserInputError(
                f"free bits apply to the KL of the ELBO: use them with `estimator='mc'` or "
                f"analytic, not {spec.name}"
            )

    def _take_instance_settings(self, spec: Any) -> None:
        if self.estimator_options:
            raise UserInputError(
                f"the estimator is an ELBO object, which carries its own settings: pass "
                f"no estimator_options ({', '.join(self.estimator_options)})"
            )
        have = getattr(spec.instance, "num_particles", 1)
        if self.particles not in (1, have):
            raise UserInputError(
                f"the estimator object has num_particles={have} and `particles` is "
                f"{self.particles}: set one of them"
            )
        object.__setattr__(self, "particles", have)

    @property
    def estimator_key(self) -> str:
        """What ``config.json`` records for the estimator: a name or an import path."""
        return estimator_key(self.estimator)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON values: the estimator as :attr:`estimator_key`."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        spec = estimator_spec(self.estimator)
        values["estimator"] = spec.key
        values["estimator_options"] = dict(self.estimator_options) or instance_options(spec)
        return values


#: learning-rate schedules (per epoch; see pyro_vae.training.schedules.learning_rate)

#: the IWAE paper's stages: learning rate lr * 10**(-i/7) for 3**i passes, i = 0..7
IWAE_STAGES = 8
#: passes over the data in the IWAE paper's schedule: 1 + 3 + ... + 3**7
IWAE_PASSES = (3**IWAE_STAGES - 1) // 2

#: training protocols from papers, applied by ``--protocol NAME`` under the config file
#: and the flags. "iwae": Burda et al. (2016), section 5 and appendix: MNIST dynamically
#: binarized, 2x200 tanh MLPs, latent 50, Adam (beta1 0.9, beta2 0.999, epsilon 1e-4),
#: batch 20, learning rate 1e-3 * 10**(-i/7) for 3**i passes, i = 0..7 (3280 passes),
#: test log p(x) with K = 5000 on the whole test set.
PROTOCOLS: dict[str, dict[str, dict[str, Any]]] = {
    "iwae": {
        "data": {"dataset": "mnist", "binarize": "dynamic"},
        "model": {"latent_dims": (50,), "hidden": (200, 200), "activation": "tanh"},
        "train": {
            "optimizer": "adam",
            "adam_epsilon": 1e-4,
            "batch_size": 20,
            "lr": 1e-3,
            "lr_schedule": "iwae",
            "epochs": IWAE_PASSES,
            "eval_samples": 5000,
            "eval_images": None,
        },
    },
}


def with_protocol(config: RunConfig, name: str) -> RunConfig:
    """``config`` with the settings of the protocol ``name`` (see :data:`PROTOCOLS`)."""
    if name not in PROTOCOLS:
        raise UserInputError(f"unknown protocol {name!r}: choose one of {', '.join(PROTOCOLS)}")
    protocol = PROTOCOLS[name]
    # a model of your own keeps its own networks: the protocol sets data and training
    model = config.model if config.model.factory else replace(config.model, **protocol["model"])
    return RunConfig(
        model=model,
        data=replace(config.data, **protocol.get("data", {})),
        train=replace(config.train, **protocol.get("train", {})),
    )


#: settings of earlier versions' ``config.json``, read into today's
LEGACY_TRAIN_KEYS = ("alpha",)


def legacy_train_section(section: dict[str, Any]) -> dict[str, Any]:
    """A train section of an earlier version: ``alpha`` (renyi's order) is now
    ``estimator_options["alpha"]``, kept only where the estimator reads it."""
    if "alpha" not in section:
        return section
    section = dict(section)
    alpha = section.pop("alpha")
    if section.get("estimator") == "renyi":
        options = dict(section.get("estimator_options") or {})
        options.setdefault("alpha", alpha)
        section["estimator_options"] = options
    return section


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs: model, data and training settings."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        if self.train.early_stopping_patience and not self.data.validation_size:
            raise UserInputError("early stopping needs a validation set: set `validation_size`")

    def to_dict(self) -> dict[str, Any]:
        """The three sections as JSON values (what ``config.json`` holds)."""
        return {
            "model": asdict(self.model),
            "data": asdict(self.data),
            "train": self.train.to_dict(),
        }

    def section(self, name: str) -> dict[str, Any]:
        """One section (``"model"``, ``"data"``, ``"train"``) as JSON values."""
        return self.to_dict()[name]

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> RunConfig:
        """Build from a nested dict; unknown sections or keys are errors."""
        if not isinstance(values, dict):
            raise UserInputError(f"{source} must hold a JSON object with sections model/data/train")
        sections = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
        unknown = set(values) - set(sections)
        if unknown:
            raise UserInputError(
                f"{source} has unknown section(s) {', '.join(sorted(unknown))}: "
                f"use only {', '.join(sections)}"
            )
        built = {}
        for name, section_class in sections.items():
            section = values.get(name, {})
            if not isinstance(section, dict):
                raise UserInputError(f"{source}: section {name!r} must be a JSON object")
            known = {f.name for f in fields(section_class)} | (
                set(LEGACY_TRAIN_KEYS) if name == "train" else set()
            )
            unknown = set(section) - known
            if unknown:
                raise UserInputError(
                    f"{source}: unknown key(s) {', '.join(sorted(unknown))} in section {name!r}; "
                    f"known keys: {', '.join(sorted(known))}"
                )
            if name == "train":
                section = legacy_train_section(section)
            try:
                built[name] = section_class(**section)
            except UserInputError as error:
                raise UserInputError(f"{source}, section {name!r}: {error}") from None
            except (TypeError, ValueError) as error:
                raise UserInputError(f"{source}: bad value in section {name!r}: {error}") from None
        return cls(**built)

    def save(self, path: str | Path) -> None:
        """Write as JSON, atomically (a kill mid-write leaves the old file)."""
        from pyro_vae.io import atomic_write_text

        atomic_write_text(json.dumps(self.to_dict(), indent=2) + "\n", path)

    @classmethod
    def load(cls, path: str | Path) -> RunConfig:
        """Read a JSON config file (at most 1 MB, nested at most 20 deep)."""
        return cls.from_dict(read_json(path, "config file"), source=f"config file {path}")
