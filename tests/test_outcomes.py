"""The one table from the policy's and keyd's refusals to wire codes is complete, and keyd's
own trouble stays retryable for the client."""

import pytest

from dccsign.protocol.codes import ErrorCode
from dccsign.protocol.keyd import RETRYABLE, ItemError
from dccsign.server.outcomes import FROM_KEYD, FROM_POLICY, failure, keyd_failure, refused
from dccsign.server.policy import Refusal, RefusalCode


def test_every_refusal_of_the_policy_has_a_wire_code():
    assert set(FROM_POLICY) == set(RefusalCode)
    assert all(isinstance(code, ErrorCode) for code in FROM_POLICY.values())


def test_every_item_error_of_keyd_has_a_wire_code():
    assert set(FROM_KEYD) == set(ItemError)
    assert {e for e, code in FROM_KEYD.items() if code is ErrorCode.KEYD_UNAVAILABLE} == RETRYABLE


@pytest.mark.parametrize("error", list(ItemError))
def test_keyd_failure(error):
    result = keyd_failure((int(error), "why"))
    assert result.error is FROM_KEYD[error] and not result.ok
    assert result.message == f"keyd refused ({error.name}): why"
    assert (result.retry_after_ms is not None) == (error in RETRYABLE)


def test_refused_carries_the_wait_in_milliseconds():
    quota = refused(Refusal(RefusalCode.QUOTA_ACCOUNT, "over quota", retry_after_s=2.5))
    assert (quota.error, quota.message, quota.retry_after_ms) == (
        ErrorCode.QUOTA_ACCOUNT,
        "over quota",
        2500,
    )
    assert failure(ErrorCode.INTERNAL, "x", retry_after_s=0.0001).retry_after_ms == 1
    assert refused(Refusal(RefusalCode.CLIENT_UNKNOWN, "who?")).retry_after_ms is None
