"""Every official test vector (../shared/testdata/dgc) through our decoder and verifier.

The flags of EXPECTEDRESULTS map onto the steps of :func:`dccsign.dcc.verify.verify_hc1`:
UNPREFIX -> prefix, B45DECODE -> base45, COMPRESSION -> zlib, DECODE -> cose/header/cwt,
VERIFY -> the signature, EXPIRATIONCHECK -> time_valid at VALIDATIONCLOCK, KEYUSAGE ->
usage_valid. SCHEMAVALIDATION is the validator's business (tests/test_dcc_validation.py).

Vectors we deliberately disagree with are listed in DISAGREE with the reason.
"""

import base64
import datetime as dt
import json
import re

import pytest

from conftest import shared_path
from dccsign.dcc.dsc import DSC
from dccsign.dcc.verify import verify_hc1

# vector -> reason. Empty: we agree with every flag we check.
DISAGREE: dict[str, str] = {}

# Vectors whose "JSON" is not what was signed: the decoded DCC is not compared to it.
JSON_NOT_SIGNED = {
    "FR/2DCode/raw/test_pcr_ok.json": "JSON sc/dr differ from the signed payload (TD#141)",
}

STEP_FLAGS = {
    "EXPECTEDUNPREFIX": {"prefix"},
    "EXPECTEDB45DECODE": {"base45"},
    "EXPECTEDCOMPRESSION": {"zlib"},
    "EXPECTEDDECODE": {"cose", "header", "cwt"},
}


def _vectors():
    root = shared_path("testdata", "dgc")
    return sorted(root.glob("**/2DCode/raw/*.json"))


def _clock(text: str) -> dt.datetime:
    # Vector clocks come with 0-9 fractional digits, "+0200" offsets, or no offset (UTC).
    m = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:?\d\d)?", text)
    assert m, text
    frac = (m.group(2) or "")[:7]
    offset = m.group(3) or "+00:00"
    if offset == "Z":
        offset = "+00:00"
    elif ":" not in offset:
        offset = offset[:3] + ":" + offset[3:]
    return dt.datetime.fromisoformat(m.group(1) + frac + offset)


def pytest_generate_tests(metafunc):
    if "vector" in metafunc.fixturenames:
        metafunc.parametrize("vector", _vectors(), ids=lambda p: "/".join(p.parts[-4:]))


def test_vector(vector):
    name = "/".join(vector.parts[-4:])
    if name in DISAGREE:
        pytest.skip(DISAGREE[name])
    data = json.loads(vector.read_text(encoding="utf-8"))
    expected = data.get("EXPECTEDRESULTS", {})
    ctx = data.get("TESTCTX", {})
    if "PREFIX" not in data or "CERTIFICATE" not in ctx:
        pytest.skip("no HC1 string or no DSC in this vector (picture-only case)")
    dsc = DSC.from_bytes(base64.b64decode(ctx["CERTIFICATE"]))
    at = _clock(ctx["VALIDATIONCLOCK"]) if ctx.get("VALIDATIONCLOCK") else None
    result = verify_hc1(data["PREFIX"], [dsc], at=at)
    failed_steps = {e["step"] for e in result.errors}
    checked = 0
    for flag, steps in STEP_FLAGS.items():
        if flag in expected:
            assert (not failed_steps & steps) == expected[flag], (flag, result.errors)
            checked += 1
    if "EXPECTEDVERIFY" in expected:
        assert result.valid == expected["EXPECTEDVERIFY"], result.errors
        checked += 1
    if "EXPECTEDEXPIRATIONCHECK" in expected and at is not None:
        assert result.time_valid == expected["EXPECTEDEXPIRATIONCHECK"], result.errors
        checked += 1
    # Key usage is judged only for the DSC that verified the signature: PL */6 (signed by
    # another key) expects KEYUSAGE true of a DSC that did not sign it, which we leave unjudged.
    if "EXPECTEDKEYUSAGE" in expected and result.valid:
        assert result.usage_valid == expected["EXPECTEDKEYUSAGE"], result.errors
        checked += 1
    if result.valid and "JSON" in data and name not in JSON_NOT_SIGNED:
        # What we decode is what the vector says was signed.
        assert result.dcc == data["JSON"]
    if not checked:
        pytest.skip(f"no flag we check: {sorted(expected)}")
