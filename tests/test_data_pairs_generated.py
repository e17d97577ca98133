"""`spatialrl data pairs`: shapes-world prompt pairs rendered by a diffusers pipeline (the tiny
random FLUX here), written with the preference-pair schema."""

import numpy as np
import pytest
import torch

from spatialrl.cli import main
from spatialrl.data.generated import load_generator, sample_prompt_pairs
from spatialrl.data.grammar import parse_prompt
from spatialrl.data.pairs import decode_image, read_pairs
from spatialrl.data.shapes import HELD_OUT_COMBOS


def _combos(prompt):
    return {o.identity for o in parse_prompt(prompt).objects}


def test_prompt_pairs_perturb_1_to_3_relations_and_split_by_held_out_combos():
    pairs = sample_prompt_pairs(12, "org/Some-Model", seed=3, test_fraction=0.25)
    assert [p.split for p in pairs] == ["train"] * 9 + ["test"] * 3
    assert [p.num_perturbed for p in pairs[:9]] == [1, 2, 3] * 3
    assert pairs[0].pair_id == "Some-Model-3-train-0000000"
    assert len({p.pair_id for p in pairs}) == 12
    for pair in pairs:
        scene, perturbed = parse_prompt(pair.prompt), parse_prompt(pair.perturbed_prompt)
        assert pair.prompt != pair.perturbed_prompt
        assert set(scene.objects) == set(perturbed.objects)
        assert len(scene.relations) == len(perturbed.relations) >= pair.num_perturbed
        held_out = _combos(pair.prompt) & HELD_OUT_COMBOS
        assert bool(held_out) == (pair.split == "test")
    assert sample_prompt_pairs(12, "org/Some-Model", seed=3, test_fraction=0.25) == pairs
    assert sample_prompt_pairs(12, "org/Some-Model", seed=4, test_fraction=0.25) != pairs


def test_data_pairs_cli_with_tiny_flux(tiny_flux_path, tmp_path, capsys):
    out = tmp_path / "pairs"
    argv = ["data", "pairs", "--model", str(tiny_flux_path), "--out", str(out), "--n", "3",
            "--size", "32", "--steps", "2", "--seed", "1", "--test-fraction", "0.34",
            "--batch-size", "2", "--device", "cpu", "--verifier", "none",
            "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "train: 2 pairs" in printed and "test: 1 pairs" in printed

    expected = sample_prompt_pairs(3, str(tiny_flux_path), seed=1, test_fraction=0.34)
    train, test = read_pairs(out / "train.parquet"), read_pairs(out / "test.parquet")
    assert train.skipped == {} and test.skipped == {}
    written = train.pairs + test.pairs
    assert [(p.pair_id, p.prompt, p.perturbed_prompt, p.num_perturbed, p.split)
            for p in written] == [
        (p.pair_id, p.prompt, p.perturbed_prompt, p.num_perturbed, p.split) for p in expected
    ]
    assert {p.source for p in written} == {str(tiny_flux_path)}

    # Each side is what the pipeline draws for its own prompt from the pair's seed, alone.
    pipeline = load_generator(str(tiny_flux_path))
    for pair, prompts in zip(written, expected, strict=True):
        for data, prompt in ((pair.image_preferred, prompts.prompt),
                             (pair.image_rejected, prompts.perturbed_prompt)):
            image = decode_image(data)
            assert image.size == (32, 32)
            alone = pipeline(
                prompt=prompt, height=32, width=32, num_inference_steps=2,
                generator=torch.Generator().manual_seed(prompts.image_seed),
            ).images[0]
            difference = np.abs(np.asarray(image, int) - np.asarray(alone, int))
            assert difference.max() <= 1  # uint8 rounding of a batched vs a lone forward
    # Different seeds give different images: the seed is what the two sides share.
    first, second = (np.asarray(decode_image(p.image_preferred), int) for p in written[:2])
    assert np.abs(first - second).mean() > 5


def test_data_pairs_cli_missing_model_is_named(tmp_path, capsys):
    missing = tmp_path / "no-such-pipeline"
    argv = ["data", "pairs", "--model", str(missing), "--out", str(tmp_path / "out"), "--n", "2"]
    assert main(argv) == 2
    assert f"--model {str(missing)!r}: no diffusers pipeline there" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_data_pairs_cli_rejects_bad_numbers():
    for bad in (["--n", "0"], ["--n", "2", "--steps", "0"], ["--n", "2", "--size", "-8"]):
        with pytest.raises(SystemExit):
            main(["data", "pairs", "--model", "m", "--out", "o", *bad])
