from __future__ import annotations

import pytest

from flywheel.learner.targets import resolve_targets


def test_plain_targets_pass_through_in_order_without_duplicates() -> None:
    assert resolve_targets(["b:1", "a:2", "b:1"]) == ["b:1", "a:2"]


def test_dns_name_expands_to_every_address() -> None:
    resolved = resolve_targets(["dns:///localhost:50051"])
    assert "127.0.0.1:50051" in resolved
    assert all(r.endswith(":50051") for r in resolved)


@pytest.mark.parametrize("bad", ["dns:///nameonly", "dns:///name:port"])
def test_malformed_dns_target_names_the_fix(bad: str) -> None:
    with pytest.raises(ValueError, match="write dns:///NAME:PORT"):
        resolve_targets([bad])
