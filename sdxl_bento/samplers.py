"""The sampler table: every sampler the service offers, once.

A request names one (``scheduler``: ``euler``, ``dpmpp_2m_karras``, ...); the engine builds the diffusers
scheduler from ``scheduler`` and ``config``; an image's infotext and AUTOMATIC1111's API call it by ``label``
and accept its ``aliases``. Adding a sampler is adding a row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Mapping


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


_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}

SAMPLERS: tuple[SamplerSpec, ...] = (
    SamplerSpec("euler", "Euler", "EulerDiscreteScheduler", aliases=("k_euler",)),
    SamplerSpec("euler_a", "Euler a", "EulerAncestralDiscreteScheduler", aliases=("k_euler_a", "k_euler_ancestral"),
                options={"uses_ensd": "True"}),
    SamplerSpec("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", _DPMPP, aliases=("k_dpmpp_2m",)),
    SamplerSpec("dpmpp_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                {**_DPMPP, "use_karras_sigmas": True}, aliases=("k_dpmpp_2m_ka",), options={"scheduler": "karras"}),
    SamplerSpec("ddim", "DDIM", "DDIMScheduler", aliases=("ddim",)),
    SamplerSpec("unipc", "UniPC", "UniPCMultistepScheduler", aliases=("unipc",)),
)
BY_NAME: dict[str, SamplerSpec] = {spec.name: spec for spec in SAMPLERS}

Sampler = Enum("Sampler", {spec.name: spec.name for spec in SAMPLERS}, type=str)  # type: ignore[misc]
"""The request field's type (``scheduler``): one member per row."""


def label(name: str) -> str:
    return BY_NAME[name].label
