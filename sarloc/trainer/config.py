"""Training configuration: frozen dataclasses plus named presets."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from sarloc.core.config import build_dataclass
from sarloc.core.errors import ConfigError
from sarloc.core.preprocess import PreprocessConfig
from sarloc.trainer.data.pairs import AugmentConfig
from sarloc.trainer.models.encoder import EncoderConfig

ALIGN_MODES = ("none", "wasserstein", "classifier")
METRIC_LOSSES = ("infonce", "triplet", "both")
#: numeric precision of training: FP32, or autocast to bfloat16 / float16 (float16 with a gradient scaler, CUDA only)
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs (written into the run folder and the checkpoint).

    Attributes:
        window_px: SAR window / optical tile side, pixels.
        steps: optimisation steps.
        batch_size: pairs per step (per process under DDP).
        scenes_per_batch: scenes mixed in one batch.
        lr, weight_decay, warmup_steps: AdamW with linear warm-up then cosine decay.
        metric_loss: "infonce", "triplet" or "both".
        temperature: InfoNCE temperature.
        margin: triplet margin (cosine distance).
        align: modality alignment: "none", "wasserstein" (critic + gradient penalty) or "classifier"
            (gradient-reversal modality classifier, the seed's "class adv").
        align_weight: weight of the alignment term in the encoder loss.
        align_start: step at which the alignment term switches on (critic warms up before).
        critic_steps: critic updates per encoder step (on detached embeddings; cheap).
        critic_lr: critic learning rate (Adam, betas 0.5/0.9 as in WGAN-GP).
        gp_weight: gradient-penalty weight.
        max_minutes: stop early after this wall time (0 = no limit).
        seed: random seed.
        threads: torch intra-op threads (0 = leave torch's default).
        log_every: steps between log lines.
        bn_recalib_batches: batches used to re-estimate batch-norm statistics after training (precise BN).
        refiner_weight: weight of the graph refiner's listwise loss trained jointly with the encoder
            (:mod:`sarloc.trainer.joint`); 0 trains the encoder alone (the refiner is then trained post-hoc).
        refiner_k: candidates per in-batch list of the joint refiner (its nodes).
        refiner_lr_scale: the refiner's learning rate relative to ``lr`` (same schedule).
        checkpoint_every: steps between resumable checkpoints (``RUN/resume.pt``; 0 = by time only).
        checkpoint_minutes: minutes of training between resumable checkpoints (0 = by steps only). Whatever these
            say, one is also written when training ends, is interrupted (SIGINT/SIGTERM) or reaches ``max_minutes``.
        precision: "fp32" (the default and the reference), "bf16" (autocast to bfloat16, CUDA or CPU) or "fp16"
            (autocast to float16 with a gradient scaler, CUDA only); weights and losses stay FP32 either way.
    """

    window_px: int = 64
    steps: int = 1500
    batch_size: int = 64
    scenes_per_batch: int = 4
    lr: float = 5e-4
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    metric_loss: str = "infonce"
    temperature: float = 0.07
    margin: float = 0.3
    align: str = "wasserstein"
    align_weight: float = 0.1
    align_start: int = 50
    critic_steps: int = 3
    critic_lr: float = 2e-4
    gp_weight: float = 10.0
    max_minutes: float = 0.0
    seed: int = 0
    threads: int = 0
    log_every: int = 25
    bn_recalib_batches: int = 20
    refiner_weight: float = 0.0
    refiner_k: int = 10
    refiner_lr_scale: float = 4.0
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    precision: str = "fp32"
    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.align not in ALIGN_MODES:
            raise ConfigError(f"align must be one of {ALIGN_MODES}, got {self.align!r}")
        if self.metric_loss not in METRIC_LOSSES:
            raise ConfigError(f"metric_loss must be one of {METRIC_LOSSES}, got {self.metric_loss!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.steps < 1 or self.batch_size < 2 or self.window_px < 16:
            raise ConfigError("need steps >= 1, batch_size >= 2 and window_px >= 16")
        positive = {"lr": self.lr, "temperature": self.temperature, "critic_lr": self.critic_lr}
        non_negative = {
            "weight_decay": self.weight_decay,
            "warmup_steps": self.warmup_steps,
            "margin": self.margin,
            "align_weight": self.align_weight,
            "align_start": self.align_start,
            "critic_steps": self.critic_steps,
            "gp_weight": self.gp_weight,
            "max_minutes": self.max_minutes,
            "threads": self.threads,
            "bn_recalib_batches": self.bn_recalib_batches,
            "checkpoint_every": self.checkpoint_every,
            "checkpoint_minutes": self.checkpoint_minutes,
        }
        bad = [k for k, v in positive.items() if not v > 0] + [k for k, v in non_negative.items() if not v >= 0]
        bad += [k for k, v in {"scenes_per_batch": self.scenes_per_batch, "log_every": self.log_every}.items() if v < 1]
        if bad:
            raise ConfigError(
                f"training config: {', '.join(bad)} out of range (lr, temperature, critic_lr > 0; scenes_per_batch, "
                "log_every >= 1; the other numbers >= 0)"
            )
        if self.refiner_weight < 0 or self.refiner_k < 2 or self.refiner_lr_scale <= 0:
            raise ConfigError(
                f"need refiner_weight >= 0, refiner_k >= 2 and refiner_lr_scale > 0, got {self.refiner_weight}, "
                f"{self.refiner_k}, {self.refiner_lr_scale}"
            )
        if self.encoder.in_channels != self.preprocess.channels:
            raise ConfigError(
                f"encoder.in_channels ({self.encoder.in_channels}) must equal the preprocessing "
                f"channels ({self.preprocess.channels} = 1 + n_orient)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready nested dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "training config") -> TrainConfig:
        """Inverse of :meth:`to_dict`. Unknown keys, values of the wrong type and out-of-range values raise a
        one-line ConfigError naming the key and ``where`` (a ``--config`` file, a checkpoint)."""
        if not isinstance(d, dict):
            raise ConfigError(f"{where}: expected a JSON object of settings, got {type(d).__name__}")
        subs = {"encoder": EncoderConfig, "preprocess": PreprocessConfig, "augment": AugmentConfig}
        kwargs = dict(d)
        for k, sub_cls in subs.items():
            if k not in kwargs:
                continue
            v = kwargs[k]
            if k == "augment" and isinstance(v, dict) and isinstance(v.get("speckle_looks"), list):
                v = {**v, "speckle_looks": tuple(v["speckle_looks"])}  # JSON has no tuples
            kwargs[k] = build_dataclass(sub_cls, v, f"{where} [{k}]")
        return build_dataclass(cls, kwargs, where)

    def to_json(self) -> str:
        """Indented JSON."""
        return json.dumps(self.to_dict(), indent=2)


PRESETS: dict[str, dict[str, Any]] = {
    # <= 30 min on a 2-core CPU on the shared scenes
    "default": {"steps": 1500, "max_minutes": 28.0},
    # leave-one-scene-out runs: <= 10 min each
    "loso": {"steps": 300, "max_minutes": 9.5},
    # the fresh-machine main job / demo model on a generated scene: about a minute
    "quick": {"steps": 120, "batch_size": 32, "warmup_steps": 10, "align_start": 20, "log_every": 20},
    # tests
    "smoke": {
        "steps": 6,
        "batch_size": 8,
        "scenes_per_batch": 1,
        "warmup_steps": 1,
        "align_start": 2,
        "log_every": 2,
        "encoder": {"pretrained": False, "last_block": 3, "shared_from": 1, "embed_dim": 32},
    },
}


def resolve_config(preset: str = "default", **overrides: Any) -> TrainConfig:
    """Preset + overrides -> TrainConfig. Nested overrides use dicts (e.g. encoder={"pretrained": False})."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = TrainConfig().to_dict()
    for src in (PRESETS[preset], {k: v for k, v in overrides.items() if v is not None}):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(base.get(k), dict):
                base[k] = {**base[k], **v}
            else:
                base[k] = v
    return TrainConfig.from_dict(base)


#: fields that may differ between an interrupted run and its ``--resume``: they change when training stops, how
#: fast it runs and what is logged or saved, never what is learned at a given step
RESUME_FREE_KEYS = ("max_minutes", "threads", "log_every", "checkpoint_every", "checkpoint_minutes")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(
    old: TrainConfig, new: TrainConfig, ignore: tuple[str, ...] = RESUME_FREE_KEYS
) -> list[tuple[str, Any, Any]]:
    """The fields in which ``new`` differs from ``old`` as ``(dotted key, old value, new value)``, in field order,
    leaving out the keys of ``ignore`` (by default those a resumed run may change)."""
    a, b = _flat(old.to_dict()), _flat(new.to_dict())
    return [(k, a.get(k), b.get(k)) for k in dict.fromkeys([*a, *b]) if k not in ignore and a.get(k) != b.get(k)]


def with_overrides(cfg: TrainConfig, **kw: Any) -> TrainConfig:
    """dataclasses.replace that reports bad keys as ConfigError."""
    try:
        return replace(cfg, **kw)
    except TypeError as e:
        raise ConfigError(str(e)) from None
