"""The admin-token verdicts and the dashboard's session check of streamapp.web.auth (the read-token,
peer-token and write-key checks have their tests in tests/web/test_read_access.py and tests/api/)."""

from __future__ import annotations

from types import SimpleNamespace

from streamapp.web.auth import AdminAccess, admin_token_check, is_read_token, peer_token


def test_admin_token_check_disabled_refused_allowed() -> None:
    assert admin_token_check("", "Bearer anything") is AdminAccess.DISABLED
    assert admin_token_check("", None) is AdminAccess.DISABLED
    assert admin_token_check("adm", None) is AdminAccess.REFUSED
    assert admin_token_check("adm", "adm") is AdminAccess.REFUSED  # a bearer token, not a raw header
    assert admin_token_check("adm", "Bearer other") is AdminAccess.REFUSED
    assert admin_token_check("adm", "Basic adm") is AdminAccess.REFUSED
    assert admin_token_check("adm", "Bearer adm") is AdminAccess.ALLOWED
    assert admin_token_check("adm", "bearer  adm ") is AdminAccess.ALLOWED  # scheme case-insensitive


def test_only_the_read_token_itself_opens_a_dashboard_session() -> None:
    def request(authorization: str) -> SimpleNamespace:
        return SimpleNamespace(headers={"Authorization": authorization}, query={}, cookies={})

    assert is_read_token(request("Bearer r"), "r")
    assert not is_read_token(request(f"Bearer {peer_token('r')}"), "r")
    assert not is_read_token(request("Bearer x"), "r")
    assert not is_read_token(request(""), "r")
