"""The preference loader: built-ins, module:function, file.py:function, and clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from flywheel.demo.preferences import BUILTINS, PreferenceError, load_preference


def test_builtins_load_and_rank_as_named() -> None:
    positive = load_preference("positive_sentiment")
    assert positive("great and I liked it.") > positive("terrible and awful.")
    assert load_preference("negative_sentiment")("awful.") > load_preference("negative_sentiment")("lovely!")
    assert load_preference("short_answers")("ok.") > load_preference("short_answers")("ok but it was long.")
    assert load_preference("exclamations")("fun!") > load_preference("exclamations")("fun.")
    assert load_preference("mentions_food")("the food was tasty") == 1.0
    assert set(BUILTINS) >= {"positive_sentiment", "short_answers", "mentions_food"}


def test_module_function_and_file_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_prefs.py").write_text("def likes_b(text):\n    return text.count('b')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_prefs", raising=False)
    by_module = load_preference("my_prefs:likes_b")
    assert by_module("bbb") == 3.0
    by_file = load_preference(f"{tmp_path / 'my_prefs.py'}:likes_b")
    assert by_file("ab") == 1.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nonsense", "give a built-in"),
        ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
        ("json:no_such_function", "'json' has no attribute 'no_such_function'"),
        ("math:pi", "not a function"),
        ("/does/not/exist.py:fn", "does not exist"),
        ("os.path:join", "must return a number"),
        (":fn", "give a built-in"),
    ],
)
def test_bad_specs_say_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(PreferenceError, match=message):
        load_preference(spec)


def test_a_function_that_raises_or_returns_nan_is_refused(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def boom(text):\n    raise KeyError(text)\n\ndef nan(text):\n    return float('nan')\n")
    with pytest.raises(PreferenceError, match="KeyError"):
        load_preference(f"{tmp_path / 'bad.py'}:boom")
    with pytest.raises(PreferenceError, match="finite"):
        load_preference(f"{tmp_path / 'bad.py'}:nan")
    (tmp_path / "broken.py").write_text("def (:\n")
    with pytest.raises(PreferenceError, match="SyntaxError"):
        load_preference(f"{tmp_path / 'broken.py'}:fn")


def test_cli_exits_2_on_a_bad_preference(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flywheel.cli import app

    result = CliRunner().invoke(app, ["demo", "--preference", "no_such_module_xyz:fn", "--run-dir", str(tmp_path)])
    assert result.exit_code == 2
    assert "no module named 'no_such_module_xyz'" in " ".join(result.output.split())
    assert not (tmp_path / "cluster").exists()  # refused before anything started
