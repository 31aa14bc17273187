"""The one place that chooses how a retrain job trains, evaluates, refuses, publishes and pushes.

Everything the benchmark may tune later is a field of :class:`JobOptions`; prompts and training
take their own dataclasses (``PromptConfig``, ``TrainConfig``) built here from the server settings
plus optional overrides. A job may carry overrides (``{"job": {...}, "prompt": {...},
"train": {...}, "crossfit": {...}}``); the server never sends any, tests and benchmarks do.

Cross-fitting (``CrossfitConfig``, on by default) teaches the negative prompt from out-of-fold
mistakes and from fold models' agreement on cached pool embeddings. In the benchmark it lifts
``p_clean``'s error-detection AUROC from 0.65 to 0.73 (max-softmax: 0.75), at three to four times
the training cost.

Warm start vs re-initialisation: ``warm_start=False`` (default) re-initialises the prompts every
round, PCB's protocol, so a version depends only on the annotations and the seed (re-running a job
on the same annotations gives the same model). ``warm_start=True`` continues from the served
version when it has the same classes, backbone and prompt config (cheaper, but a version then
depends on the whole history). Evaluation folds always re-initialise, so the figures stay honest.

Refusal rule (step 4): a new version is refused, and the served one kept, when
``accuracy_new < accuracy_baseline - refuse_tolerance`` and both were measured on at least
``refuse_min_eval`` held-out annotations. The baseline is the served version's stored accuracy, or,
when version 0 (zero-shot) is served, zero-shot CLIP's accuracy on the very same held-out items.
A training loss that is not finite is always refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from dpal_core.config import CrossfitConfig, PromptConfig, TrainConfig

if TYPE_CHECKING:
    from backend.settings import Settings


@dataclass(frozen=True)
class JobOptions:
    """Knobs of one retrain job (not of the model: those are PromptConfig / TrainConfig)."""

    warm_start: bool = False  # continue from the served version instead of re-initialising
    eval_folds: int = 5  # k of k-fold evaluation when annotations are few
    kfold_below: int = 200  # fewer usable annotations than this: k-fold; else a held-out split
    holdout_fraction: float = 0.2  # share of annotations held out (stratified) when not k-fold
    min_eval_labels: int = 4  # fewer usable annotations than this: no evaluation, no refusal
    refuse_tolerance: float = 0.10  # absolute accuracy drop that counts as "clearly worse"
    refuse_min_eval: int = 30  # both evaluations need this many held-out items to refuse
    page_size: int = 1000  # tasks per Label Studio list page
    embed_chunk: int = 512  # images fetched + encoded per step (bounds memory, gives progress)
    score_chunk: int = (
        131_072  # cached embeddings scored per step: one text-encoder pass each (256 MB at D=512)
    )
    push_chunk: int = 500  # predictions per import call
    shard_size: int = 20_000  # unlabelled tasks above this are re-scored by shard jobs
    http_attempts: int = 6  # tries per Label Studio call (1 + retries)
    backoff_s: float = 1.0  # first retry delay; doubles each retry
    backoff_max_s: float = 30.0  # cap of one retry delay
    http_timeout_s: float = 60.0  # per Label Studio request
    heartbeat_s: float = 15.0  # run-lock refresh period (lock TTL is backend.queue.LOCK_TTL_S)
    prompt: dict[str, Any] = field(default_factory=dict)  # PromptConfig field overrides
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig field overrides
    crossfit: dict[str, Any] = field(default_factory=dict)  # CrossfitConfig field overrides

    def __post_init__(self) -> None:
        for name in (
            "eval_folds",
            "page_size",
            "embed_chunk",
            "score_chunk",
            "push_chunk",
            "shard_size",
            "http_attempts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)!r}")
        if not 0.0 < self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction!r}")
        if self.eval_folds < 2:
            raise ValueError("eval_folds must be >= 2")

    @classmethod
    def from_overrides(cls, overrides: dict[str, Any] | None) -> JobOptions:
        """Defaults updated with ``{"job": {...}, "prompt": {...}, "train": {...}, "crossfit": {...}}``."""
        overrides = dict(overrides or {})
        sections = ("prompt", "train", "crossfit")
        unknown = set(overrides) - {"job", *sections}
        if unknown:
            raise ValueError(f"unknown override sections {sorted(unknown)}; use job, prompt, train, crossfit")
        job = dict(overrides.get("job") or {})
        known = {f.name for f in fields(cls)} - set(sections)
        bad = set(job) - known
        if bad:
            raise ValueError(f"unknown job options {sorted(bad)}")
        return replace(cls(), **{name: dict(overrides.get(name) or {}) for name in sections}, **job)


def prompt_config(settings: Settings, options: JobOptions) -> PromptConfig:
    """Prompts of a new version: the paradigm from ``DPAL_PARADIGM``, the rest PromptConfig's defaults."""
    return PromptConfig(**{"paradigm": settings.paradigm, **options.prompt})


def train_config(settings: Settings, options: JobOptions) -> TrainConfig:
    """Training of a new version: CoOp/PCB defaults on the device of ``DPAL_DEVICE``."""
    device = settings.device if settings.device in ("auto", "cpu", "cuda") else "cuda"  # cuda:N -> cuda
    return TrainConfig(**{"device": device, "progress": False, **options.train})


def crossfit_config(options: JobOptions) -> CrossfitConfig:
    """How P- learns from real mistakes: CrossfitConfig's defaults unless overridden."""
    return CrossfitConfig(**options.crossfit)
