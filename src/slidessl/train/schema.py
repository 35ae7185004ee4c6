"""Typed schemas of the pretraining config, one dataclass per section.

OmegaConf checks every value against these (struct mode: an unknown key is an error, a value
that cannot be converted to the field's type is an error naming the key), so code reading a
loaded config gets ints, floats, bools and lists of the documented types. The defaults and
their documentation live in ``configs/default.yaml`` (as in dinov2's
``ssl_default_config.yaml``); fields here are ``MISSING`` except the ``crops`` section, whose
schema and defaults are :class:`slidessl.data.views.MultiCropConfig` itself.
``model.overrides`` is :class:`EncoderOverrides`: every option of
:class:`slidessl.models.presets.EncoderConfig` with its type (choices as its enums) and no
default (``None``: the preset's value; :func:`slidessl.train.config.load_config` keeps only
the options set).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from slidessl.data.views import MultiCropConfig
from slidessl.models.presets import EncoderConfig

__all__ = ["EncoderOverrides", "PretrainConfig"]


def _optional(kind):
    """The run-config type of an encoder option's type: ``Optional``, tuples as lists."""
    if typing.get_origin(kind) is tuple:
        kind = list[typing.get_args(kind)[0]]
    return typing.Optional[kind]  # noqa: UP045 (OmegaConf reads typing.Optional)


# the encoder options a recipe changes over its preset, typed from EncoderConfig itself
_ENCODER_TYPES = typing.get_type_hints(EncoderConfig)
EncoderOverrides = dataclasses.make_dataclass(
    "EncoderOverrides",
    [
        (f.name, _optional(_ENCODER_TYPES[f.name]), field(default=None))
        for f in dataclasses.fields(EncoderConfig)
    ],
)
EncoderOverrides.__module__ = __name__


@dataclass
class DataConfig:
    manifest: str | None = MISSING
    max_tiles: int = MISSING
    order: str = MISSING
    on_bad_slide: str = MISSING
    num_workers: int = MISSING
    prefetch_factor: int = MISSING
    pin_memory: Any = MISSING  # "auto" or a bool
    patient_pairs: float = MISSING


@dataclass
class ModelConfig:
    name: str = MISSING
    overrides: EncoderOverrides = field(default_factory=EncoderOverrides)


@dataclass
class HeadConfig:
    loss_weight: float = MISSING
    out_dim: int = MISSING
    hidden_dim: int = MISSING
    bottleneck_dim: int = MISSING
    nlayers: int = MISSING
    student_temp: float = MISSING
    center_momentum: float = MISSING


@dataclass
class DinoConfig(HeadConfig):
    centering: str = MISSING
    readout: str = MISSING


@dataclass
class IbotConfig(HeadConfig):
    separate_head: bool = MISSING
    chunk_tokens: int | None = MISSING
    max_masked_per_crop: int | None = MISSING


@dataclass
class WeightConfig:
    loss_weight: float = MISSING


@dataclass
class ArrangeConfig:
    loss_weight: float = MISSING
    temperature: float = MISSING


@dataclass
class TeacherConfig:
    momentum: float = MISSING
    momentum_end: float = MISSING
    temp: float = MISSING
    warmup_temp: float = MISSING
    warmup_temp_epochs: float = MISSING


@dataclass
class OptimConfig:
    lr: float = MISSING
    lr_reference_batch: int = MISSING
    scale_lr: bool = MISSING
    min_lr: float = MISSING
    warmup_epochs: float = MISSING
    weight_decay: float = MISSING
    weight_decay_end: float = MISSING
    betas: list[float] = MISSING
    eps: float = MISSING
    layer_decay: float = MISSING
    clip_grad: float | None = MISSING
    freeze_last_layer_epochs: float = MISSING


@dataclass
class TrainConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    accum_steps: int = MISSING
    steps_per_epoch: int | None = MISSING
    max_steps: int | None = MISSING
    precision: str = MISSING
    device: str = MISSING
    grad_checkpointing: bool = MISSING
    pack_crops: bool = MISSING
    memory_check: str = MISSING
    memory_budget_gb: float | None = MISSING
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    max_nan_steps: int = MISSING
    grad_norm_warn: float | None = MISSING
    progress: bool = MISSING
    tensorboard: bool = MISSING


@dataclass
class MonitorConfig:
    window_slides: int = MISSING
    usage_min_frac: float = MISSING
    kl_center_min: float = MISSING
    cls_std_min_frac: float = MISSING
    loss_stall_steps: int = MISSING
    eval_manifest: str | None = MISSING
    eval_task: str | None = MISSING
    eval_every: int = MISSING
    eval_k: int = MISSING
    eval_pooling: str = MISSING
    eval_max_tiles: int | None = MISSING


@dataclass
class DistributedConfig:
    backend: str = MISSING
    strategy: str = MISSING
    find_unused_parameters: bool = MISSING
    timeout_minutes: float = MISSING


@dataclass
class PretrainConfig:
    seed: int = MISSING
    out: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    koleo: WeightConfig = field(default_factory=WeightConfig)
    vicreg: WeightConfig = field(default_factory=WeightConfig)
    arrange: ArrangeConfig = field(default_factory=ArrangeConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
