"""Load profiles for ``dccsign bench load``: the intended arrival rate over time.

A profile is a base rate (certificates per second) and a list of phases; each phase lasts a
number of seconds and holds a *level* -- a multiple of the base rate -- or moves linearly
from ``level`` to ``to_level``. So ``--rate`` rescales a whole profile and ``--duration``
stretches it, without touching its shape. Profiles are small TOML files::

    name = "spike"                 # optional; default: the file name without .toml
    description = "launch day"     # optional
    base_rate = 500                # certificates/s that level 1 stands for (> 0)
    arrivals = "poisson"           # "poisson" (independent arrivals) or "uniform" (evenly spaced)
    wait_for_pool = false          # optional: before sending anything, wait until every key's
                                   # nonce pool (read from --metrics) is full (--pool-wait)
    min_duration = 10              # optional: --duration may not shrink the profile below this

    [[phase]]
    duration = 10                  # seconds (> 0)
    level = 1                      # rate = level x base_rate (>= 0)

    [[phase]]
    duration = 5
    level = 1
    to_level = 10                  # optional: linear from level to to_level over the phase

Unknown keys are errors (a typo must not silently become the default). The built-in presets
(:data:`PRESETS`) are written in the same format and parsed by the same code.

``wait_for_pool`` is a flag for the load generator, not part of the rate: the run (and so
every rate) starts only once the pool is full, and the time spent waiting counts nowhere
(:func:`dccsign.bench.loadpool.wait_for_full_pool`). ``min_duration`` guards a profile whose point
is its length (``burst``: at least 10 s at full rate); :meth:`Profile.scaled` refuses a
shorter ``--duration`` rather than silently running a different test.

Arrival times come from the cumulative rate Lambda(t) = integral of rate from 0 to t, which is
piecewise quadratic and inverted exactly: request k of a uniform schedule is due when Lambda
reaches (k + 1/2) x certificates per request; a Poisson schedule draws exponential gaps in
Lambda (the time-rescaling construction of a non-homogeneous Poisson process). Either way the
expected number of certificates offered is Lambda(duration), whatever the batch size.
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

__all__ = ["ARRIVALS", "PRESETS", "Phase", "Profile", "ProfileError", "load_profile"]

#: Arrival processes a profile may ask for.
ARRIVALS = ("poisson", "uniform")
#: No profile may run longer than a day (a typo like 36000 for 3600 should not hang a CI run).
MAX_DURATION = 86_400.0
MAX_RATE = 10_000_000.0


class ProfileError(ValueError):
    """A profile cannot be used; the message names the source and the field."""


@dataclass(frozen=True, slots=True)
class Phase:
    """*duration* seconds, the rate moving linearly from ``level`` to ``to_level`` (x base)."""

    duration: float
    level: float
    to_level: float

    def cumulative(self, tau: float) -> float:
        """Level-seconds from the phase start to *tau* seconds into it."""
        slope = (self.to_level - self.level) / self.duration
        return self.level * tau + slope * tau * tau / 2


@dataclass(frozen=True, slots=True)
class Profile:
    """An intended rate over time (see the module docstring). Rates are certificates/s."""

    name: str
    base_rate: float
    phases: tuple[Phase, ...]
    arrivals: str = "poisson"
    description: str = ""
    #: Wait until every key's nonce pool is full before sending anything (module docstring).
    wait_for_pool: bool = False
    #: The shortest total duration ``--duration`` may give it (0: any).
    min_duration: float = 0.0

    @property
    def duration(self) -> float:
        return sum(p.duration for p in self.phases)

    def rate_at(self, t: float) -> float:
        """The intended rate at *t* seconds (0 outside the profile)."""
        start = 0.0
        for p in self.phases:
            if t < start + p.duration:
                if t < start:
                    return 0.0
                frac = (t - start) / p.duration
                return self.base_rate * (p.level + (p.to_level - p.level) * frac)
            start += p.duration
        return 0.0

    def cumulative(self, t: float) -> float:
        """Certificates intended from 0 to *t* seconds (Lambda(t))."""
        total, start = 0.0, 0.0
        for p in self.phases:
            if t <= start:
                break
            total += p.cumulative(min(t - start, p.duration))
            start += p.duration
        return total * self.base_rate

    def time_for(self, u: float) -> float | None:
        """The time at which :meth:`cumulative` reaches *u*; None if it never does."""
        start, left = 0.0, u / self.base_rate
        for p in self.phases:
            whole = p.cumulative(p.duration)
            if left <= whole and whole > 0:
                # Solve level*tau + slope*tau^2/2 = left for the first tau >= 0. Written as
                # 2 left / (level + sqrt(level^2 + 2 slope left)) to stay exact when the slope
                # is zero or tiny, and when level is zero (a ramp from 0).
                slope = (p.to_level - p.level) / p.duration
                disc = max(p.level * p.level + 2 * slope * left, 0.0)
                denom = p.level + math.sqrt(disc)
                tau = 2 * left / denom if denom > 0 else 0.0
                return start + min(tau, p.duration)
            left -= whole
            start += p.duration
        return None

    def arrival_times(self, certs_per_request: int, seed: int | None = None) -> Iterator[float]:
        """Intended start times (seconds from 0, increasing) of requests carrying
        *certs_per_request* certificates each, until the profile ends."""
        if certs_per_request < 1:
            raise ValueError("certs_per_request must be at least 1")
        n = float(certs_per_request)
        if self.arrivals == "uniform":
            k = 0
            while (t := self.time_for((k + 0.5) * n)) is not None:
                yield t
                k += 1
            return
        rng = random.Random(seed)
        u = 0.0
        while True:
            u += rng.expovariate(1.0) * n
            t = self.time_for(u)
            if t is None:
                return
            yield t

    def scaled(
        self,
        *,
        rate: float | None = None,
        duration: float | None = None,
        arrivals: str | None = None,
    ) -> Profile:
        """This profile with another base rate, total duration (phases stretched in
        proportion) or arrival process.

        Raises:
            ProfileError: a value out of range, or a *duration* below ``min_duration``.
        """
        out = self
        if rate is not None:
            if not 0 < rate <= MAX_RATE:
                raise ProfileError(f"--rate must be in (0, {MAX_RATE:g}] certificates/s")
            out = replace(out, base_rate=float(rate))
        if duration is not None:
            if not 0 < duration <= MAX_DURATION:
                raise ProfileError(f"--duration must be in (0, {MAX_DURATION:g}] seconds")
            if duration < out.min_duration:
                raise ProfileError(
                    f"--duration {duration:g}: profile {out.name!r} runs at least "
                    f"{out.min_duration:g} s (its min_duration); give a longer --duration"
                )
            factor = duration / out.duration
            out = replace(
                out, phases=tuple(replace(p, duration=p.duration * factor) for p in out.phases)
            )
        if arrivals is not None:
            if arrivals not in ARRIVALS:
                raise ProfileError(f"arrivals must be one of {', '.join(ARRIVALS)}")
            out = replace(out, arrivals=arrivals)
        return out

    def to_toml(self) -> str:
        """The profile in the file format (what ``--print-profile`` shows)."""
        lines = [f"name = {_toml_str(self.name)}"]
        if self.description:
            lines.append(f"description = {_toml_str(self.description)}")
        lines += [f"base_rate = {_num(self.base_rate)}", f"arrivals = {_toml_str(self.arrivals)}"]
        if self.wait_for_pool:
            lines.append(
                "wait_for_pool = true  # first wait until every key's nonce pool is full "
                "(--metrics, --pool-wait)"
            )
        if self.min_duration:
            lines.append(f"min_duration = {_num(self.min_duration)}  # --duration cannot go below")
        for p in self.phases:
            lines += ["", "[[phase]]", f"duration = {_num(p.duration)}", f"level = {_num(p.level)}"]
            if p.to_level != p.level:
                lines.append(f"to_level = {_num(p.to_level)}")
        return "\n".join(lines) + "\n"

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "base_rate": self.base_rate,
            "arrivals": self.arrivals,
            "duration_s": self.duration,
            "wait_for_pool": self.wait_for_pool,
            "min_duration_s": self.min_duration,
            "intended_certs": self.cumulative(self.duration),
            "phases": [
                {"duration": p.duration, "level": p.level, "to_level": p.to_level}
                for p in self.phases
            ],
        }


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _toml_str(s: str) -> str:
    escaped = s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


# ----------------------------------------------------------------------------- parsing

_TOP = ("name", "description", "base_rate", "arrivals", "wait_for_pool", "min_duration", "phase")
_PHASE = ("duration", "level", "to_level")


def _number(value: Any, where: str, *, positive: bool, limit: float) -> float:
    # TOML integers and floats are both fine; booleans are ints in Python and are not.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProfileError(f"{where}: must be a number, not {type(value).__name__}")
    x = float(value)
    ok = 0 < x <= limit if positive else 0 <= x <= limit
    if not ok or not math.isfinite(x):
        bound = "> 0" if positive else ">= 0"
        raise ProfileError(f"{where}: must be {bound} and at most {limit:g}, not {value!r}")
    return x


def _unknown(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    extra = sorted(set(table) - set(allowed))
    if extra:
        raise ProfileError(
            f"{where}: unknown key(s) {', '.join(extra)} (allowed: {', '.join(allowed)})"
        )


def parse_profile(text: str, source: str, default_name: str = "custom") -> Profile:
    """Parse the TOML *text* of a profile; *source* names it in error messages.

    Raises:
        ProfileError: the text is not TOML, or breaks the format (the field is named).
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"profile {source}: not valid TOML: {exc}") from None
    try:
        return _profile(doc, default_name)
    except ProfileError as exc:
        raise ProfileError(f"profile {source}: {exc}") from None


def _profile(doc: dict[str, Any], default_name: str) -> Profile:
    _unknown(doc, _TOP, "top level")
    name = doc.get("name", default_name)
    description = doc.get("description", "")
    for key, value in (("name", name), ("description", description)):
        if not isinstance(value, str):
            raise ProfileError(f"{key}: must be a string")
    if "base_rate" not in doc:
        raise ProfileError("base_rate: missing (certificates/s that level 1 stands for)")
    base = _number(doc["base_rate"], "base_rate", positive=True, limit=MAX_RATE)
    arrivals = doc.get("arrivals", "poisson")
    if arrivals not in ARRIVALS:
        raise ProfileError(f"arrivals: must be one of {', '.join(ARRIVALS)}, not {arrivals!r}")
    wait_for_pool = doc.get("wait_for_pool", False)
    if not isinstance(wait_for_pool, bool):
        raise ProfileError("wait_for_pool: must be true or false")
    min_duration = 0.0
    if "min_duration" in doc:
        min_duration = _number(
            doc["min_duration"], "min_duration", positive=True, limit=MAX_DURATION
        )
    raw = doc.get("phase")
    if not isinstance(raw, list) or not raw:
        raise ProfileError("phase: at least one [[phase]] table is needed")
    phases = []
    for i, table in enumerate(raw):
        where = f"phase[{i}]"
        if not isinstance(table, dict):
            raise ProfileError(f"{where}: must be a table ([[phase]])")
        _unknown(table, _PHASE, where)
        for key in ("duration", "level"):
            if key not in table:
                raise ProfileError(f"{where}.{key}: missing")
        duration = _number(
            table["duration"], f"{where}.duration", positive=True, limit=MAX_DURATION
        )
        level = _number(table["level"], f"{where}.level", positive=False, limit=MAX_RATE)
        to_level = _number(
            table.get("to_level", level), f"{where}.to_level", positive=False, limit=MAX_RATE
        )
        phases.append(Phase(duration, level, to_level))
    profile = Profile(name, base, tuple(phases), arrivals, description, wait_for_pool, min_duration)
    if profile.duration > MAX_DURATION:
        raise ProfileError(f"phases: {profile.duration:g} s in all, more than {MAX_DURATION:g}")
    if profile.duration < min_duration * (1 - 1e-9):  # phases of 3.3 + 6.7 s are 10 s
        raise ProfileError(
            f"phases: {profile.duration:g} s in all, shorter than min_duration {min_duration:g}"
        )
    if profile.cumulative(profile.duration) <= 0:
        raise ProfileError("phases: every level is 0, so nothing would be sent")
    return profile


# ----------------------------------------------------------------------------- presets

#: Built-in profiles, by name, as TOML (``--profile NAME``; ``--print-profile`` shows one).
#: Their base rates suit single SIGN frames to the development engine on a 2-core machine,
#: which signs about 2,400 of them a second (bench/README.md): constant stays well below,
#: the ramp crosses that knee about half-way, and the peaks of spike and herd go slightly
#: past it, so that a queue builds and must drain. For batch frames, raise them with --rate.
#: The exception is ``burst``, about signing from a full nonce pool, sized for batch frames:
#: 5,000/s is about half the development engine's closed-loop maximum with frames of 100 in
#: bench/README.md (9,228/s); raise it with --rate to push the burst past that. Its 10 s are
#: what the issue asks for as the shortest burst, hence ``min_duration``.
PRESETS: dict[str, str] = {
    "constant": """
description = "a steady rate (base_rate) for 30 s"
base_rate = 1000
arrivals = "poisson"

[[phase]]
duration = 30
level = 1
""",
    "ramp": """
description = "from 5 % to 100 % of base_rate over 60 s, to find the knee"
base_rate = 5000
arrivals = "poisson"

[[phase]]
duration = 60
level = 0.05
to_level = 1
""",
    "spike": """
description = "launch day: 10 s at base_rate, 10 s at 10 x, 10 s back at base_rate"
base_rate = 250
arrivals = "poisson"

[[phase]]
duration = 10
level = 1

[[phase]]
duration = 10
level = 10

[[phase]]
duration = 10
level = 1
""",
    "herd": """
description = "a refresh herd: a quiet base, then a synchronized wave (20 x within 1 s, \
held 4 s, decaying over 10 s), like every app refreshing its 28-day QR at once"
base_rate = 125
arrivals = "poisson"

[[phase]]
duration = 5
level = 1

[[phase]]
duration = 1
level = 1
to_level = 20

[[phase]]
duration = 4
level = 20

[[phase]]
duration = 10
level = 20
to_level = 1

[[phase]]
duration = 5
level = 1
""",
    "burst": """
description = "launch morning with a full nonce pool: waits until every key's pool is full, \
then a burst of 10 s at base_rate (sized for batch frames, e.g. --batch 100; usually given \
with --rate)"
base_rate = 5000
arrivals = "poisson"
wait_for_pool = true
min_duration = 10

[[phase]]
duration = 10
level = 1
""",
}


def load_profile(name_or_path: str) -> Profile:
    """A preset by name, or a profile file (a path, or any name ending in ``.toml``).

    Raises:
        ProfileError: unknown preset, unreadable file, or a bad profile.
    """
    if name_or_path in PRESETS:
        return parse_profile(PRESETS[name_or_path], f"preset {name_or_path!r}", name_or_path)
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        raise ProfileError(
            f"unknown profile {name_or_path!r}: give a preset ({', '.join(PRESETS)}) "
            "or a .toml file"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProfileError(f"profile {path}: cannot read it: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ProfileError(f"profile {path}: not UTF-8 text") from None
    return parse_profile(text, str(path), path.stem)
