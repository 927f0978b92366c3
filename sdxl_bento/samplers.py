"""The sampler table: every sampler the service offers, once.

A request names one (``scheduler``: ``euler``, ``dpmpp_2m_karras``, ...); the engine builds the diffusers
scheduler from ``scheduler`` and ``config``; an image's infotext and AUTOMATIC1111's API call it by ``label``
and accept its ``aliases``. Adding a sampler is adding a row (``_family`` adds a sampler with its Karras and
exponential schedules, where the diffusers scheduler has them).

AUTOMATIC1111 1.9+ sends a sampler (``DPM++ 2M``) and a schedule type apart (``scheduler``: ``Automatic``,
``Karras``, ``Exponential``; ``Uniform`` is the plain schedule). ``Automatic`` is the schedule that A1111 gives
that sampler by default (``family_default``: Karras for DPM++ 2M, exponential for DPM++ 2M SDE, ...), so a
request means the same here as there. Older tools send the schedule inside the name (``DPM++ 2M Karras``).
A1111 samplers with no diffusers equivalent (DPM fast, DPM adaptive, DPM++ 2S a, Restart, ...) are not here:
``find`` refuses them with the list of those that are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    """The request's value."""
    label: str
    """AUTOMATIC1111's name, also the infotext's ``Sampler``."""
    scheduler: str
    """The diffusers scheduler class, built ``from_config`` of the pipeline's scheduler with ``config``."""
    config: Mapping[str, Any] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    """Other names AUTOMATIC1111 tools send (matched in any case)."""
    options: Mapping[str, str] = field(default_factory=dict)
    """AUTOMATIC1111's ``/samplers`` options."""
    family: str = ""
    """The A1111 1.9+ sampler name without the schedule (``DPM++ 2M`` for ``DPM++ 2M Karras``)."""
    schedule: str = "uniform"
    """The schedule type: ``uniform`` (the sampler's plain schedule), ``karras`` or ``exponential``."""

    @property
    def ancestral(self) -> bool:
        """Adds fresh noise at every step (A1111's eta applies; here always eta 1)."""
        return self.options.get("uses_ensd") == "True" or "sde" in self.name


SCHEDULES: dict[str, str] = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
                             "exponential": "Exponential"}
"""A1111's schedule types (``/sdapi/v1/schedulers``) that diffusers' schedulers have: name -> label."""
_SIGMAS = {"karras": {"use_karras_sigmas": True}, "exponential": {"use_exponential_sigmas": True}}


def _family(name: str, label: str, scheduler: str, config: Mapping[str, Any] | None = None, *,
            aliases: tuple[str, ...] = (), options: Mapping[str, str] | None = None,
            schedules: tuple[str, ...] = ("karras", "exponential"), default: str = "uniform") -> list[SamplerSpec]:
    """A sampler and its schedule variants: ``name``, ``name_karras`` (``label Karras``), ...; ``default`` is the
    schedule A1111 picks for ``Automatic`` (shown in ``/samplers`` as its ``scheduler`` option)."""
    config = dict(config or {})
    shown = {**(options or {}), **({"scheduler": default} if default != "uniform" else {})}
    rows = [SamplerSpec(name, label, scheduler, config, aliases, shown, label, "uniform")]
    for schedule in schedules:
        rows.append(SamplerSpec(f"{name}_{schedule}", f"{label} {SCHEDULES[schedule]}", scheduler,
                                {**config, **_SIGMAS[schedule]}, tuple(f"{a}_{schedule[:2]}" for a in aliases),
                                dict(options or {}), label, schedule))
    return rows


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS: tuple[SamplerSpec, ...] = (
    *_family("euler", "Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    *_family("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral"),
             options={"uses_ensd": "True"}, schedules=()),
    *_family("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP, aliases=("k_dpmpp_2m",),
             default="karras"),
    *_family("ddim", "DDIM", "DDIMScheduler", aliases=("ddim",), schedules=()),
    *_family("unipc", "UniPC", "UniPCMultistepScheduler", aliases=("unipc",)),
    *_family("plms", "PLMS", "PNDMScheduler", {"skip_prk_steps": True}, aliases=("plms",), schedules=()),
    *_family("lms", "LMS", "LMSDiscreteScheduler", aliases=("k_lms",)),
    *_family("heun", "Heun", "HeunDiscreteScheduler", aliases=("k_heun",)),
    *_family("dpm2", "DPM2", "KDPM2DiscreteScheduler", aliases=("k_dpm_2",), default="karras"),
    *_family("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler", aliases=("k_dpm_2_a",),
             options={"uses_ensd": "True"}, default="karras"),
    *_family("dpmpp_sde", "DPM++ SDE", "DPMSolverSDEScheduler", aliases=("k_dpmpp_sde",), default="karras"),
    *_family("dpmpp_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler", _SDE, aliases=("k_dpmpp_2m_sde",),
             default="exponential"),
    *_family("dpmpp_3m_sde", "DPM++ 3M SDE", "DPMSolverMultistepScheduler", {**_SDE, "solver_order": 3},
             aliases=("k_dpmpp_3m_sde",), default="exponential"),
)
BY_NAME: dict[str, SamplerSpec] = {spec.name: spec for spec in SAMPLERS}

Sampler = Enum("Sampler", {spec.name: spec.name for spec in SAMPLERS}, type=str)  # type: ignore[misc]
"""The request field's type (``scheduler``): one member per row."""


def label(name: str) -> str:
    return BY_NAME[name].label


def families() -> list[SamplerSpec]:
    """One row per sampler (its plain schedule), in table order."""
    return [spec for spec in SAMPLERS if spec.schedule == "uniform"]


def family_default(family: SamplerSpec) -> str:
    """The schedule AUTOMATIC1111 uses for ``family`` when asked for ``Automatic``."""
    return family.options.get("scheduler", "uniform")


class UnknownSampler(ValueError):
    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def find(name: Optional[str], schedule: Optional[str] = None) -> SamplerSpec:
    """The row for an A1111 sampler name (label, family, alias or request value, any case) and schedule type
    (``Automatic`` or absent: the name's own schedule, else A1111's default for the sampler). ``UnknownSampler``
    names the field at fault and lists what is valid."""
    wanted = (name or "Euler").strip().lower()
    spec = next((s for s in SAMPLERS if wanted in (s.label.lower(), s.name, *(a.lower() for a in s.aliases))), None)
    if spec is None:
        raise UnknownSampler(f"sampler {name!r} is not available (no diffusers equivalent); valid samplers: "
                             f"{', '.join(s.label for s in SAMPLERS)}", "sampler_name")
    kind = (schedule or "automatic").strip().lower()
    if kind not in SCHEDULES:
        raise UnknownSampler(f"schedule type {schedule!r} is not available; valid: {', '.join(SCHEDULES.values())}",
                             "scheduler")
    family = BY_NAME[next(s.name for s in families() if s.label == spec.family)]
    if kind == "automatic":
        kind = spec.schedule if spec is not family else family_default(family)
    found = next((s for s in SAMPLERS if s.family == family.label and s.schedule == kind), None)
    if found is None:
        offered = [SCHEDULES[s.schedule] for s in SAMPLERS if s.family == family.label]
        raise UnknownSampler(f"schedule type {SCHEDULES[kind]} is not available for {family.label} (its diffusers "
                             f"scheduler has none); valid for it: Automatic, {', '.join(offered)}", "scheduler")
    return found
