"""`spatialrl pretrain editor`: the base generator fine-tuned on the edit engine's train-split
triples with Kontext conditioning; the result loads as a FluxKontextPipeline and edits."""

import json

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline
from safetensors.numpy import load_file

from spatialrl.cli import main
from spatialrl.config import EditorPretraining
from spatialrl.flux.pretraining import (
    EDITS_FILE,
    INSTRUCTIONS_FILE,
    flow_matching_loss,
    pretrain_editor,
)
from spatialrl.spatialreward.edit_examples import build_example

GENERATOR = "models/shapes-flux"  # the shipped base generator
SMALL = dict(num_examples=6, batch_size=3, lr_decay_steps=0, checkpoint_every=2, log_every=2)


@pytest.fixture(scope="module")
def editor(tmp_path_factory):
    root = tmp_path_factory.mktemp("editor")
    return pretrain_editor(GENERATOR, root / "out", root / "work",
                           EditorPretraining(steps=2, **SMALL))


def test_the_editor_loads_as_flux_kontext_and_edits_an_image(editor):
    pipeline = FluxKontextPipeline.from_pretrained(editor, torch_dtype=torch.float32)
    example = build_example(0, "test", 0)
    image = pipeline(image=example.source_image, prompt=example.instruction, height=64,
                     width=64, max_area=64 * 64, num_inference_steps=2, max_sequence_length=64,
                     _auto_resize=False, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)
    # The generator's VAE and tokenizers are kept; the transformer was trained.
    generator = FluxPipeline.from_pretrained(GENERATOR, torch_dtype=torch.float32)
    assert pipeline.vae.config.scaling_factor == generator.vae.config.scaling_factor
    assert pipeline.tokenizer_2.get_vocab() == generator.tokenizer_2.get_vocab()
    changed = [not torch.equal(a, b) for a, b in zip(
        pipeline.transformer.state_dict().values(),
        generator.transformer.state_dict().values(), strict=True)]
    assert any(changed)


def test_triples_are_the_edit_engines_train_split_examples(editor):
    work = editor.parent / "work"
    instructions = json.loads((work / INSTRUCTIONS_FILE).read_text())
    renders = load_file(str(work / EDITS_FILE))
    assert len(instructions) == SMALL["num_examples"]
    for index in (0, 5):
        example = build_example(0, "train", index)
        assert instructions[index] == example.instruction
        assert np.array_equal(renders["sources"][index], np.asarray(example.source_image))
        assert np.array_equal(renders["targets"][index],
                              np.asarray(example.candidate("correct").image))


def test_the_loss_sees_the_source_image():
    """The prediction depends on the conditioning tokens: with another source in their place
    the loss changes, at the same noise."""
    pipeline = FluxPipeline.from_pretrained(GENERATOR, torch_dtype=torch.float32)
    latents = torch.randn(2, 4, 16, 16)
    settings = EditorPretraining()

    def loss(condition):
        with torch.no_grad():
            return flow_matching_loss(pipeline, latents, ["Remove the red circle."] * 2,
                                      settings, torch.Generator().manual_seed(0), condition)

    source = torch.randn(2, 4, 16, 16)
    assert loss(source) == loss(source.clone())
    assert loss(source) != loss(torch.randn(2, 4, 16, 16))
    assert loss(source) != loss(None)


def test_cli_builds_an_editor_with_its_flags(tmp_path):
    code = main(["pretrain", "editor", "--generator", GENERATOR, "--out", str(tmp_path / "out"),
                 "--work", str(tmp_path / "work"), "--steps", "1", "--num-examples", "2",
                 "--batch-size", "2", "--threads", "1"])
    assert code == 0
    settings = json.loads((tmp_path / "work" / "settings.json").read_text())
    assert (settings["steps"], settings["num_examples"]) == (1, 2)
    assert settings["max_sequence_length"] == EditorPretraining().max_sequence_length
    assert json.loads((tmp_path / "out" / "model_index.json").read_text())[
        "_class_name"] == "FluxKontextPipeline"


def test_eval_editor_reports_held_out_edit_figures_beside_the_unedited_sources(
        editor, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert main(["eval-editor", "--model", str(editor), "--edits", "3", "--num-steps", "1",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["edits"], report["split"], report["num_steps"]) == (3, "test", 1)
    assert len(report["load_average"]) == 3
    unedited, base = report["figures"]["unedited_sources"], report["figures"]["base"]
    # A source is its own edit of nothing: no edit made, nothing changed unasked.
    assert (unedited["edit_success"], unedited["over_editing"]) == (0.0, 0.0)
    assert {"edit_success", "edits_done", "over_editing", "edit_correct"} <= set(base)
    assert main(["eval-editor", "--model", str(editor), "--lora", str(tmp_path / "none")]) != 0
    assert "--lora: no LoRA folder at" in capsys.readouterr().err
