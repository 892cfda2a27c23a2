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


def test_synthesize_options_are_the_flow_parameters(monkeypatch):
    """Every SynthesizeParams field is an option; an option left out keeps the model's default."""
    import flows.synthesize as fs
    from flows.synthesize import SynthesizeParams

    seen = []

    def fake_flow(params):
        seen.append(params)
        return {
            "pages_per_lang": {}, "rejects_by_reason": {}, "out": "o", "manifest": "m", "rejects_dir": "r",
            "artifact": "a", "shards": [], "shards_worked": 0,
        }  # fmt: skip

    monkeypatch.setattr(fs, "synthesize", fake_flow)
    help_text = runner.invoke(app, ["synthesize", "--help"], terminal_width=200).output
    for field in SynthesizeParams.model_fields:
        if field != "build_models":
            assert "--" + field.replace("_", "-") in help_text, field
    args = ["synthesize", "--langs", "hi", "--no-queries", "--no-cross-lingual", "--formats", "pdf"]
    args += ["--split-fractions", '{"train": 0.5, "dev": 0.25, "benchmark": 0.25}', "--no-build"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    given = seen[-1]
    assert (given.langs, given.queries, given.cross_lingual, given.build_models) == (
        "hi",
        False,
        False,
        False,
    )
    assert given.formats == ["pdf", "png"] and given.split_fractions["benchmark"] == 0.25
    assert runner.invoke(app, ["synthesize"]).exit_code == 0
    assert seen[-1] == SynthesizeParams()  # nothing given: exactly the flow's defaults
    bad = runner.invoke(app, ["synthesize", "--split-fractions", "{train: 1}"])
    assert bad.exit_code != 0 and "not JSON" in bad.output


def test_models_hash_prints_the_pin_line_that_loads_the_checkpoint(tiny_models):
    """`m3dr models hash` gives the sha256 line a profile needs for a .pt, and that pin is accepted."""
    import re

    from tasks.models import pickle_files, resolve_source, verify_pickle

    result = runner.invoke(app, ["models", "hash", "recipe:doclayout-yolo-tiny"])
    assert result.exit_code == 0, result.output
    pin = re.search(r'sha256 = "([0-9a-f]{64})"', result.output)
    assert pin is not None and "[layout]" in result.output
    (pt,) = pickle_files(resolve_source("recipe:doclayout-yolo-tiny"))
    assert verify_pickle(pt, source=str(pt), sha256=pin.group(1)) == pin.group(1)
    nothing = runner.invoke(app, ["models", "hash", "recipe:gemma3-tiny"])
    assert nothing.exit_code == 0 and "nothing to pin" in nothing.output
