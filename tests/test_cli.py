"""What `spatialrl --help`, `--version` and each command's help tell a new user."""

from importlib.metadata import version

import pytest

from spatialrl.cli import main
from spatialrl.throughput_model import GPU_PEAK_BF16


def output_of(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    return capsys.readouterr().out


def test_version_names_the_installed_package(capsys):
    assert output_of(["--version"], capsys).strip() == f"spatialrl {version('spatialrl')}"


def test_top_level_help_says_what_the_project_does(capsys):
    text = output_of(["--help"], capsys)
    assert "console command" not in text
    assert "filtered GRPO against SpatialScore" in " ".join(text.split())


def test_generate_flags_have_help(capsys):
    text = " ".join(output_of(["generate", "--help"], capsys).split())
    assert "--prompt PROMPT the text to draw" in text
    assert "--best-of N candidates to sample" in text
    assert "candidate i uses seed + i (default: 0)" in text


def test_data_prompts_flags_have_help_and_defaults(capsys):
    text = " ".join(output_of(["data", "prompts", "--help"], capsys).split())
    for flag in ("--out FILE parquet", "--n N prompts to write", "(default: train)",
                 "--seed SEED draws the prompts (default: 0)"):
        assert flag in text, flag


def test_capacity_lists_its_gpu_types(capsys):
    text = output_of(["capacity", "--help"], capsys)
    assert "{" + ",".join(GPU_PEAK_BF16) + "}" in text
    assert "(default: l40s)" in text


def test_an_unknown_gpu_type_is_refused_by_name(capsys):
    with pytest.raises(SystemExit):
        main(["capacity", "--config", "configs/tiny.yaml", "--rollout-gpu", "v100"])
    assert "invalid choice: 'v100'" in capsys.readouterr().err
