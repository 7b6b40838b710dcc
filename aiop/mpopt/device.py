"""The device a plan is for: its memory, and how fast it trains in each precision.

The planner needs two facts the predictor may not know: how much memory the
device has (the default budget) and how long a training step takes in bf16 or
fp16 relative to fp32. A CPU without native bf16 matrix units emulates bf16
autocast with conversions around fp32 kernels, so half precision saves memory
but costs time; a GPU with tensor cores trains faster in half precision.

:class:`Device` holds these facts; :data:`BUILTIN_DEVICES` names three:

* ``cpu`` — this machine (AMD EPYC with AVX2 and F16C but no AVX512-BF16 or
  AMX: oneDNN has no native bf16/fp16 kernels for it). Its bf16/fp16 step-time
  factors are measured (``CPU_MEASUREMENT``); its memory is the machine's RAM.
* ``cuda`` — a generic 16 GiB GPU with tensor cores: bf16 and fp16 steps take
  about half fp32's time (the usual mixed-precision speed-up on Ampere-class
  GPUs; an assumption, not measured here: this project has no GPU).
* ``edge`` — a small ARM board (1 GiB free for training) whose cores have fp16
  arithmetic (ARMv8.2-A FP16) but no bf16 instructions: fp16 is faster than
  fp32, bf16 is emulated and slower. Also an assumption.

A device file is JSON with the same fields, e.g.
``{"name": "jetson", "memory_budget_mb": 2048, "precision_time": {"fp16": 0.5, "bf16": 2.0}}``.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiop.mconfig import PRECISIONS


class DeviceError(ValueError):
    """A device name or file that cannot be used."""


# How the cpu device's factors were measured (re-measure with the benchmark's precision part).
CPU_MEASUREMENT = (
    "real training steps of zoo:mobilenet_v2, batch 32 at 32 px, one thread, fp32/bf16/fp16 "
    "interleaved over 4 rounds of 3 timed steps (the procedure of benchmarks/mpopt.py --parts "
    "precision; results in benchmarks/results/mpopt_cpu_precision.json): median "
    "0.688 s fp32, 11.0 s bf16 (16.0x), 10.9 s fp16 (15.8x). zoo:resnet18 the same way, 2 rounds: "
    "1.11 s fp32, 49.0 s bf16 (44x). `aiop profile zoo:mobilenet_v2 --config bs=8,prec=P --mode "
    "real --latency` (224 px, one run each, under shared load): 3.25 s fp32, 24.4 s bf16 (7.5x)"
)


@dataclass(frozen=True)
class Device:
    """A training device as the planner sees it.

    ``precision_time``: step time in each precision relative to fp32 (fp32 is 1;
    3.0 means three times slower). ``memory_budget_mb``: the memory available
    for training (MiB), the budget when none is given. A precision missing from
    ``precision_time`` is not planned on this device.
    """

    name: str
    memory_budget_mb: float | None = None
    precision_time: dict[str, float] = field(default_factory=lambda: {"fp32": 1.0})
    description: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DeviceError("a device needs a non-empty name")
        budget = self.memory_budget_mb
        if budget is not None and (
            isinstance(budget, bool)
            or not isinstance(budget, int | float)
            or not math.isfinite(budget)
            or budget <= 0
        ):
            raise DeviceError(
                f"device {self.name!r}: memory_budget_mb must be a positive number, got {budget!r}"
            )
        times = dict(self.precision_time)
        times.setdefault("fp32", 1.0)
        for prec, factor in times.items():
            if prec not in PRECISIONS:
                raise DeviceError(
                    f"device {self.name!r}: unknown precision {prec!r} in precision_time; "
                    f"choose from {', '.join(PRECISIONS)}"
                )
            if (
                isinstance(factor, bool)
                or not isinstance(factor, int | float)
                or not math.isfinite(factor)
                or factor <= 0
            ):
                raise DeviceError(
                    f"device {self.name!r}: precision_time[{prec!r}] must be a positive "
                    f"number, got {factor!r}"
                )
        if times["fp32"] != 1.0:
            raise DeviceError(f"device {self.name!r}: precision_time is relative to fp32 = 1")
        object.__setattr__(self, "precision_time", {p: float(v) for p, v in times.items()})

    # -- what the planner asks -----------------------------------------------------
    @property
    def precisions(self) -> tuple[str, ...]:
        """The precisions this device trains in, in PRECISIONS order."""
        return tuple(p for p in PRECISIONS if p in self.precision_time)

    def time_factor(self, prec: str) -> float:
        """Step time in ``prec`` relative to fp32 (1.0 where unknown)."""
        return self.precision_time.get(prec, 1.0)

    def is_fast(self, prec: str) -> bool:
        """Whether ``prec`` trains faster than fp32 here (fp32 itself is not 'fast')."""
        return prec != "fp32" and self.time_factor(prec) < 1.0

    @property
    def fast_bf16(self) -> bool:
        return self.is_fast("bf16")

    @property
    def fast_fp16(self) -> bool:
        return self.is_fast("fp16")

    def precision_note(self, prec: str) -> str:
        """One phrase on what ``prec`` costs in time on this device."""
        factor = self.time_factor(prec)
        if prec == "fp32":
            return f"fp32 is {self.name}'s reference speed"
        way = "faster" if factor < 1 else "slower" if factor > 1 else "as fast"
        return f"{prec} steps take {factor:g}× fp32's time on {self.name} ({way})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "memory_budget_mb": self.memory_budget_mb,
            "precision_time": dict(self.precision_time),
            "fast_bf16": self.fast_bf16,
            "fast_fp16": self.fast_fp16,
            "description": self.description,
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "device") -> Device:
        if not isinstance(data, dict):
            raise DeviceError(f"{where}: expected a JSON object with name, memory_budget_mb, ...")
        known = {"name", "memory_budget_mb", "precision_time", "description"}
        extra = sorted(set(data) - known - {"fast_bf16", "fast_fp16"})
        if extra:
            raise DeviceError(
                f"{where}: unknown field(s) {', '.join(extra)}; known: {', '.join(sorted(known))}"
            )
        times = data.get("precision_time", {"fp32": 1.0})
        if not isinstance(times, dict):
            raise DeviceError(f'{where}: precision_time must be an object like {{"bf16": 3.0}}')
        return cls(
            name=data.get("name") or "",
            memory_budget_mb=data.get("memory_budget_mb"),
            precision_time=times,
            description=str(data.get("description", "")),
        )


def _physical_memory_mb() -> float | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (ValueError, OSError, AttributeError):  # not POSIX: no default budget
        return None


# Measured on this machine with the default model, zoo:mobilenet_v2 (CPU_MEASUREMENT). The
# factor depends on the network (ResNet-18's is 44); what matters for planning is that it
# is far above 1: on this CPU half precision only ever buys memory, never time.
CPU_BF16_TIME = 16.0
CPU_FP16_TIME = 15.8


def builtin_devices() -> dict[str, Device]:
    """The named devices (``cpu`` reads this machine's RAM when asked)."""
    return {
        "cpu": Device(
            "cpu",
            _physical_memory_mb(),
            {"fp32": 1.0, "bf16": CPU_BF16_TIME, "fp16": CPU_FP16_TIME},
            "this machine's CPU: half-precision autocast is emulated, slower than fp32",
        ),
        "cuda": Device(
            "cuda",
            16384.0,
            {"fp32": 1.0, "bf16": 0.5, "fp16": 0.5},
            "a generic 16 GiB GPU with tensor cores: bf16/fp16 about twice fp32's speed",
        ),
        "edge": Device(
            "edge",
            1024.0,
            {"fp32": 1.0, "bf16": 2.5, "fp16": 0.6},
            "a small ARM board: fp16 arithmetic in hardware, bf16 emulated",
        ),
    }


BUILTIN_DEVICES: tuple[str, ...] = ("cpu", "cuda", "edge")
DEFAULT_DEVICE = "cpu"


def get_device(spec: str | Device | None) -> Device:
    """A :class:`Device` for a built-in name, a JSON file's path, or a Device (None: ``cpu``)."""
    if isinstance(spec, Device):
        return spec
    if spec is None:
        spec = DEFAULT_DEVICE
    if not isinstance(spec, str) or not spec:
        raise DeviceError(f"a device is a name or a JSON file, got {spec!r}")
    builtins = builtin_devices()
    if spec in builtins:
        return builtins[spec]
    path = Path(spec)
    if path.suffix.lower() != ".json" and not path.exists():
        raise DeviceError(
            f"unknown device {spec!r}; choose one of {', '.join(BUILTIN_DEVICES)} "
            "or give a .json device file"
        )
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DeviceError(f"device file {spec} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeviceError(f"device file {spec} cannot be read: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DeviceError(f"device file {spec} is not valid JSON: {exc}") from None
    return Device.from_dict(data, f"device file {spec}")
