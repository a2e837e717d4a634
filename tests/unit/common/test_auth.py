from __future__ import annotations

from pathlib import Path

import pytest

from flywheel.common.auth import Access, Authenticator, hash_key, load_api_keys


def test_api_keys_file_round_trip(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text(f"# comment\napp-a {hash_key('secret-a')}\n\napp-b {hash_key('secret-b')}  # trailing\n")
    keys = load_api_keys(file)
    auth = Authenticator("tok", keys)
    assert auth.principal("secret-a") == (Access.PUBLIC, "app-a")
    assert auth.principal("secret-b") == (Access.PUBLIC, "app-b")
    assert auth.principal("tok") == (Access.INTERNAL, "internal")
    assert auth.principal("secret-c") is None
    assert auth.principal(hash_key("secret-a")) is None  # the stored digest is not a credential


def test_bad_key_line_names_the_line(tmp_path: Path) -> None:
    file = tmp_path / "keys"
    file.write_text("app-a not-a-digest\n")
    with pytest.raises(ValueError, match=r"keys:1: expected '<client-name> <sha256-hex-of-key>'"):
        load_api_keys(file)


def test_no_internal_token_means_nothing_is_internal() -> None:
    auth = Authenticator("", [])
    assert auth.principal("") is None
    assert auth.principal("anything") is None
