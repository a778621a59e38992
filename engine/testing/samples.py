"""Sample DCCs (schema 1.3.0), one per type, for the demo and the benchmarks.

The people are fictitious; names carry non-ASCII characters on purpose.
"""

from __future__ import annotations

import copy
import random
from typing import Any

from ..dcc.uvci import make_uvci

__all__ = ["FIELD_NAMES", "NEAR_MISS", "SAMPLES", "field_slots", "sample", "varied_samples"]

#: The keys of a DCC's objects at every level, schema 1.x (for fuzzers that build near misses).
FIELD_NAMES: tuple[str, ...] = (
    "ver", "nam", "dob", "v", "t", "r",
    "fn", "fnt", "gn", "gnt",
    "tg", "vp", "mp", "ma", "dn", "sd", "dt", "co", "is", "ci",
    "tt", "nm", "sc", "dr", "tr", "tc",
    "fr", "df", "du",
)  # fmt: skip

#: Values one step from what a DCC field accepts (dates, codes, UVCIs, lengths at their
#: limits, wrong types): the validator's fuzzers put them in a field's place.
NEAR_MISS: tuple[Any, ...] = (
    "",
    "1979",
    "1979-02",
    "1899",
    "2021-02-29",
    "2020-02-29",
    "0000-01-01",
    "2021-13-01",
    "2021-07-01T09:30:00Z",
    "2021-07-01T09:30:00+0200",
    "2021-07-01T24:00:00Z",
    "2021-07-01T09:30:00.1234567890Z",
    "LP217198-3",
    "J07BX03",
    "EU/1/20/1528",
    "ORG-100030215",
    "260373001",
    "XY",
    "NL",
    "nl",
    "URN:UVCI:01:NL:187/37512422923#Y",
    "URN:UVCI:01:NL:187/37512422923#Z",
    "urn:uvci:01:nl:abc",
    "ABC<DEF",
    "abc",
    0,
    1,
    9,
    10,
    99,
    100,
    -1,
    2**64 - 1,
    -(2**64),
    1.0,
    2.5,
    float("nan"),
    True,
    False,
    None,
    [],
    {},
    [1],
    {"a": 1},
    b"NL",
    "A" * 50,
    "A" * 51,
    "é" * 80,
    "é" * 81,
    "<" * 81,
)

SAMPLES: dict[str, dict[str, Any]] = {
    "v": {
        "ver": "1.3.0",
        "nam": {"fn": "Bakker-Çelik", "fnt": "BAKKER<CELIK", "gn": "Sanne Zoë", "gnt": "SANNE<ZOE"},
        "dob": "1964-08-12",
        "v": [
            {
                "tg": "840539006",
                "vp": "1119349007",
                "mp": "EU/1/20/1528",
                "ma": "ORG-100030215",
                "dn": 2,
                "sd": 2,
                "dt": "2021-06-21",
                "co": "NL",
                "is": "Ministry of Health Welfare and Sport",
                "ci": make_uvci("NL", "187", "37512422923"),
            }
        ],
    },
    "t": {
        "ver": "1.3.0",
        "nam": {"fn": "Jansen", "fnt": "JANSEN", "gn": "Mïrthe", "gnt": "MIRTHE"},
        "dob": "1990-01",
        "t": [
            {
                "tg": "840539006",
                "tt": "LP6464-4",
                "nm": "Roche LightCycler qPCR",
                "sc": "2021-07-01T09:30:00Z",
                "tr": "260415000",
                "tc": "Testlocatie Utrecht",
                "co": "NL",
                "is": "Ministry of Health Welfare and Sport",
                "ci": make_uvci("NL", "TEST", "8H2K7Q9ZX1"),
            }
        ],
    },
    "r": {
        "ver": "1.3.0",
        "nam": {"fn": "de Vries", "fnt": "DE<VRIES", "gn": "Jörg", "gnt": "JOERG"},
        "dob": "1978",
        "r": [
            {
                "tg": "840539006",
                "fr": "2021-05-02",
                "co": "NL",
                "is": "Ministry of Health Welfare and Sport",
                "df": "2021-05-13",
                "du": "2021-10-29",
                "ci": make_uvci("NL", "REC", "42GQ61D7MPA3"),
            }
        ],
    },
}


def sample(dcc_type: str) -> dict[str, Any]:
    """A fresh deep copy of the sample of *dcc_type* ("v", "t" or "r")."""
    return copy.deepcopy(SAMPLES[dcc_type])


_SURNAMES = [
    ("Öztürk", "OEZTUERK"),
    ("Müller", "MUELLER"),
    ("Nguyễn", "NGUYEN"),
    ("van den Berg", "VAN<DEN<BERG"),
    ("Dvořák", "DVORAK"),
    ("Ødegård", "OEDEGAARD"),
]
_GIVEN = [
    ("Anaïs", "ANAIS"),
    ("Joël", "JOEL"),
    ("Zoë", "ZOE"),
    ("Søren", "SOEREN"),
    ("Łukasz", "LUKASZ"),
    ("Maria", "MARIA"),
]


def varied_samples(n: int, seed: int = 2021) -> list[dict[str, Any]]:
    """*n* distinct, valid DCCs cycling through the three types (deterministic for a seed)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        dcc = sample("vtr"[i % 3])
        fn, fnt = rng.choice(_SURNAMES)
        gn, gnt = rng.choice(_GIVEN)
        dcc["nam"] = {"fn": fn, "fnt": fnt, "gn": gn, "gnt": gnt}
        dcc["dob"] = f"{rng.randint(1930, 2015)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        entry = dcc["vtr"[i % 3]][0]
        entry["ci"] = make_uvci("NL", "GP", f"{rng.getrandbits(48):012X}")
        out.append(dcc)
    return out


def field_slots(dcc: dict[str, Any]) -> list[tuple[dict[str, Any], str]]:
    """Every (object, key) pair in a DCC, including the top level, in document order: the
    places where a fuzzer may replace, delete or add a field. Objects that are not where
    schema 1.x puts them are left out."""
    out = [(dcc, k) for k in dcc]
    if isinstance(dcc.get("nam"), dict):
        out += [(dcc["nam"], k) for k in dcc["nam"]]
    for kind in "vtr":
        group = dcc.get(kind)
        if isinstance(group, list):
            for entry in group:
                if isinstance(entry, dict):
                    out += [(entry, k) for k in entry]
    return out


if __name__ == "__main__":
    import json

    for t in ("v", "t", "r"):
        print(json.dumps(SAMPLES[t], ensure_ascii=False))
