"""Named streams of drifting domains over the real digits, for online retraining.

A stream is a schedule of domains — clean digits first, then CIFAR-10-C-style
corruptions (:mod:`aiop.tasks.corruptions`) whose type and severity change
over time — over :func:`aiop.tasks.digits.load_digits_split`. A
:class:`Stream` turns a named schedule into training batches (from the
``train`` split, ``steps_per_domain`` batches per domain), a probe set per
domain (the ``val`` split: for comparing candidate configurations) and an
evaluation set per domain (the ``test`` split). Images are resized to the
model's resolution, corrupted there and repeated to three channels; every
array is deterministic in ``seed`` and cached in memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from aiop.tasks.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from aiop.tasks.digits import DataError, load_digits_split


class StreamError(DataError):
    """An unknown stream name or impossible stream settings."""


@dataclass(frozen=True)
class Domain:
    """Clean digits (``corruption`` None) or one corruption at one severity."""

    corruption: str | None = None
    severity: int = 0

    def __post_init__(self) -> None:
        if self.corruption is None:
            if self.severity:
                raise StreamError("the clean domain has no severity")
        elif self.corruption not in CORRUPTIONS or self.severity not in SEVERITIES:
            raise StreamError(f"bad domain {self.corruption!r} at severity {self.severity}")

    @property
    def name(self) -> str:
        return "clean" if self.corruption is None else f"{self.corruption}-{self.severity}"

    @classmethod
    def parse(cls, text: str) -> Domain:
        """``clean`` or ``CORRUPTION-SEVERITY`` (e.g. ``fog-3``)."""
        if text == "clean":
            return cls()
        name, _, sev = text.rpartition("-")
        if name not in CORRUPTIONS or not sev.isdigit() or int(sev) not in SEVERITIES:
            raise StreamError(
                f"bad domain {text!r}: use 'clean' or CORRUPTION-SEVERITY with a corruption of "
                f"{', '.join(CORRUPTIONS)} and a severity 1-5"
            )
        return cls(name, int(sev))


@dataclass(frozen=True)
class StreamSpec:
    """A named schedule of domains over one digit source."""

    name: str
    description: str
    domains: tuple[Domain, ...]
    source: str = "mnist"


def _domains(*names: str) -> tuple[Domain, ...]:
    return tuple(Domain.parse(n) for n in names)


# digits-c: one corruption of each CIFAR-10-C group and more, at changing severities.
_DIGITS_C_SCHEDULE = _domains(
    "clean",
    "gaussian_noise-3",
    "motion_blur-3",
    "fog-4",
    "contrast-4",
    "impulse_noise-5",
    "zoom_blur-3",
    "snow-4",
)

STREAMS: dict[str, StreamSpec] = {
    s.name: s
    for s in (
        StreamSpec(
            "digits-c",
            "clean MNIST digits, then seven corruptions (one of each CIFAR-10-C group and more) "
            "at changing severities",
            _DIGITS_C_SCHEDULE,
        ),
        StreamSpec(
            "digits-c-all",
            "clean MNIST digits, then all 15 corruptions at severity 5 (Tent's protocol)",
            (Domain(), *(Domain(c, 5) for c in CORRUPTIONS)),
        ),
        StreamSpec(
            "digits-c-gradual",
            "gaussian noise rising from severity 1 to 5 and falling back (gradual drift)",
            _domains(
                "clean",
                *(f"gaussian_noise-{s}" for s in (1, 2, 3, 4, 5, 4, 3, 2, 1)),
            ),
        ),
        StreamSpec(
            "digits-c-short",
            "clean MNIST digits, then gaussian noise and fog (a short stream for tests)",
            _domains("clean", "gaussian_noise-4", "fog-4"),
        ),
        StreamSpec(
            "sklearn-digits-c",
            "the digits-c schedule over scikit-learn's 8x8 digits",
            _DIGITS_C_SCHEDULE,
            source="sklearn",
        ),
    )
}


def get_stream(name: str) -> StreamSpec:
    """The stream called ``name``; an unknown name lists the valid ones."""
    spec = STREAMS.get(name)
    if spec is None:
        raise StreamError(f"unknown stream {name!r}; valid streams: {', '.join(STREAMS)}")
    return spec


def _resize(images: np.ndarray, resolution: int) -> np.ndarray:
    """(N, H, W) → (N, R, R), bilinear (antialiased when shrinking)."""
    if images.shape[-1] == resolution and images.shape[-2] == resolution:
        return images.astype(np.float32)
    import torch
    from torch.nn.functional import interpolate

    t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    shrink = resolution < max(images.shape[-2:])
    out = interpolate(t, size=(resolution, resolution), mode="bilinear", antialias=shrink)
    return out[:, 0].clamp_(0, 1).numpy()


@lru_cache(maxsize=64)
def domain_split(
    domain: Domain,
    split: str,
    *,
    source: str = "mnist",
    resolution: int = 32,
    seed: int = 0,
    limit: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, R, R)`` float32 in [0, 1] and labels of one domain's split.

    ``limit`` keeps a stratified-by-shuffle subset of that many images (the first
    ``limit`` of a seeded permutation), corrupting only those. Cached; treat the
    arrays as read-only.
    """
    data = load_digits_split(source, split, seed)
    idx = np.arange(len(data))
    if limit is not None and limit < len(idx):
        rng = np.random.default_rng([seed, 7919, len(idx)])
        idx = np.sort(rng.permutation(len(idx))[:limit])
    images = _resize(data.images[idx], resolution)
    if domain.corruption is not None:
        images = corrupt(images, domain.corruption, domain.severity, seed=seed)
    rgb = np.repeat(images[:, None], 3, axis=1).astype(np.float32)
    rgb.setflags(write=False)
    labels = data.labels[idx].copy()
    labels.setflags(write=False)
    return rgb, labels


class Stream:
    """A named stream made concrete: batches per step, probe and evaluation sets per domain."""

    def __init__(
        self,
        name: str,
        *,
        resolution: int = 32,
        batch_size: int = 32,
        steps_per_domain: int = 20,
        seed: int = 0,
        eval_size: int = 500,
        probe_size: int = 200,
    ) -> None:
        self.spec = get_stream(name)
        for key, value in (
            ("resolution", resolution),
            ("batch_size", batch_size),
            ("steps_per_domain", steps_per_domain),
            ("eval_size", eval_size),
            ("probe_size", probe_size),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StreamError(f"{key} must be a positive integer, got {value!r}")
        self.resolution = resolution
        self.batch_size = batch_size
        self.steps_per_domain = steps_per_domain
        self.seed = seed
        self.eval_size = eval_size
        self.probe_size = probe_size

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def domains(self) -> tuple[Domain, ...]:
        return self.spec.domains

    def __len__(self) -> int:
        """Total training steps."""
        return len(self.domains) * self.steps_per_domain

    def domain_index(self, step: int) -> int:
        if not 0 <= step < len(self):
            raise StreamError(f"step {step} is outside the stream's {len(self)} steps")
        return step // self.steps_per_domain

    def domain_at(self, step: int) -> Domain:
        return self.domains[self.domain_index(step)]

    def _train_pool(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        need = self.steps_per_domain * self.batch_size
        # each domain draws its own subset of the train split (seeded by the domain's position)
        return domain_split(
            self.domains[index],
            "train",
            source=self.spec.source,
            resolution=self.resolution,
            seed=self.seed + 1000 * index,
            limit=need,
        )

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The training batch of ``step``: (images (B, 3, R, R), labels (B,))."""
        index = self.domain_index(step)
        images, labels = self._train_pool(index)
        k = step - index * self.steps_per_domain
        n = len(labels)
        rng = np.random.default_rng([self.seed, index, 17])
        order = rng.permutation(n)
        take = order[np.arange(k * self.batch_size, (k + 1) * self.batch_size) % n]
        return images[take], labels[take]

    def eval_set(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``test`` split of domain ``index`` (at most ``eval_size`` images)."""
        return domain_split(
            self.domains[index],
            "test",
            source=self.spec.source,
            resolution=self.resolution,
            seed=self.seed,
            limit=self.eval_size,
        )

    def probe_set(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The ``val`` split of domain ``index`` (at most ``probe_size`` images): for Aco probes."""
        return domain_split(
            self.domains[index],
            "val",
            source=self.spec.source,
            resolution=self.resolution,
            seed=self.seed,
            limit=self.probe_size,
        )

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "description": self.spec.description,
            "source": self.spec.source,
            "domains": [d.name for d in self.domains],
            "steps_per_domain": self.steps_per_domain,
            "batch_size": self.batch_size,
            "resolution": self.resolution,
        }
