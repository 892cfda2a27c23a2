"""The `m3dr` console script: argument checking and the registry commands (no flow runs here)."""

from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def test_languages_lists_all_22():
    result = runner.invoke(app, ["languages"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 22
    assert any(line.startswith("ar ") and " rtl " in line for line in lines)


def test_bad_format_is_a_usage_error():
    result = runner.invoke(app, ["synthesize", "--formats", "png,docx"])
    assert result.exit_code != 0
    assert "docx" in result.output


def test_fonts_verify_passes_on_bundled_fonts():
    result = runner.invoke(app, ["fonts", "verify"])
    assert result.exit_code == 0, result.output
    assert "15 font families OK" in result.output


def test_models_list_shows_each_stage_of_full_profile():
    result = runner.invoke(app, ["models", "list", "--profile", "full"])
    assert result.exit_code == 0, result.output
    assert "facebook/nllb-200-distilled-600M" in result.output
    assert "doclayout-yolo" in result.output


def test_unknown_profile_is_a_clear_error():
    result = runner.invoke(app, ["models", "list", "--profile", "nope"])
    assert result.exit_code != 0
    assert "known profiles" in str(result.exception) + result.output
