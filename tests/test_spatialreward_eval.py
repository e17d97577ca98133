"""SpatialReward evaluation: region IoU and its matching, pairing by negative type (single and
multi-edit), invalid answers counted and never ranked, the attention-collapse probe, the
benchmark-file format, and `spatialrl spatialreward eval` end to end on the tiny model."""

import json

import pytest
from PIL import Image

from spatialrl.cli import main
from spatialrl.errors import InputError
from spatialrl.spatialreward.answers import EditAnswer, EditRegion, QualityAnswer, parse_answer
from spatialrl.spatialreward.edit_examples import (
    QUALITY_ANSWER,
    build_edit_examples,
    read_edit_rows,
    write_edit_examples,
)
from spatialrl.spatialreward.evaluation import (
    JudgedCandidate,
    box_iou,
    judge_rows,
    read_bench_pairs,
    region_iou,
    score_bench,
    summarise,
)
from spatialrl.spatialreward.reward import RewardWeights, combine


def region(box, region_id=0):
    return EditRegion(id=region_id, label="x", bbox_2d=box)


def test_box_iou():
    assert box_iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert box_iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert box_iou([0, 0, 10, 10], [20, 20, 30, 30]) == 0.0


def test_regions_match_greedily_best_first_and_unmatched_ones_count_zero():
    truth = [region([0, 0, 100, 100]), region([500, 500, 600, 600], 1)]
    exact = [region([500, 500, 600, 600]), region([0, 0, 100, 100], 1)]
    assert region_iou(exact, truth) == 1.0  # order does not matter
    half = [region([0, 0, 100, 50])]
    assert region_iou(half, truth) == pytest.approx(0.5 / 2)  # one truth box unmatched
    # Both predictions overlap the first truth box; the better one takes it, the other is
    # left unmatched (0) rather than matched twice.
    doubled = [region([0, 0, 100, 50]), region([0, 0, 100, 90], 1)]
    assert region_iou(doubled, truth[:1]) == pytest.approx(0.9 / 2)
    assert region_iou([], []) == 1.0  # a no-op seen as one
    assert region_iou([], truth) == 0.0 and region_iou(half, []) == 0.0


# --------------------------------------------------------- summaries of hand-built answers


def edit_answer(score, boxes=()):
    regions = [{"id": i, "label": "x", "bbox_2d": list(box)} for i, box in enumerate(boxes)]
    return json.dumps({"edit_region": regions, "reasoning": "<|global|> ok",
                       "score": list(score)})


def judged(example_id, num_edits, candidate, answer, truth_boxes=((0, 0, 100, 100),),
           quality=QUALITY_ANSWER):
    truth = parse_answer(edit_answer((25, 25), truth_boxes), EditAnswer).answer
    result = combine(parse_answer(answer, EditAnswer), parse_answer(quality, QualityAnswer),
                     RewardWeights(), 25)
    return JudgedCandidate(example_id, num_edits, candidate, truth, result)


BOX = (0, 0, 100, 100)
HALF = (0, 0, 100, 50)
JUDGED = [
    # A single edit: correct wins against over_editing, loses against no_op.
    judged("one", 1, "correct", edit_answer((24, 25), [BOX])),
    judged("one", 1, "over_editing", edit_answer((25, 10), [BOX, (500, 500, 600, 600)])),
    judged("one", 1, "no_op", edit_answer((25, 25), [HALF]), truth_boxes=()),
    # Two edits: correct ties partial; wrong_relation's answer is cut short; wrong_object's
    # quality answer is not JSON.
    judged("two", 2, "correct", edit_answer((20, 25), [HALF])),
    judged("two", 2, "partial", edit_answer((20, 25), [BOX])),
    judged("two", 2, "wrong_relation", edit_answer((5, 25), [BOX])[:-8]),
    judged("two", 2, "wrong_object", edit_answer((5, 25), [BOX]), quality="fine"),
]


def test_valid_rate_counts_every_answer_and_invalid_ones_by_reason():
    summary = summarise(JUDGED)
    assert (summary["candidates"], summary["examples"]) == (7, 2)
    assert (summary["answers"], summary["valid_answers"]) == (14, 12)
    assert summary["valid_json_rate"] == pytest.approx(12 / 14)
    assert summary["invalid_by_reason"] == {"edit:truncated": 1, "quality:not_json": 1}


def test_region_iou_covers_valid_edit_answers_only():
    regions = summarise(JUDGED)["region_iou"]
    # correct 1, over_editing 1/2 (an extra box), no_op 0 (truth empty), correct 0.5,
    # partial 1, wrong_object 1 (its edit answer is valid); wrong_relation is not there.
    assert regions["answers"] == 6
    assert regions["mean"] == pytest.approx((1 + 0.5 + 0 + 0.5 + 1 + 1) / 6)
    assert regions["by_candidate"]["correct"] == pytest.approx(0.75)
    assert regions["by_candidate"]["wrong_relation"] is None


def test_pairs_by_negative_type_single_and_multi_edit_with_invalid_pairs_not_ranked():
    pairwise = summarise(JUDGED)["pairwise"]
    single, multi, overall = pairwise["single_edit"], pairwise["multi_edit"], pairwise["all"]
    assert (single["pairs"], single["valid_pairs"], single["accuracy"]) == (2, 2, 0.5)
    assert single["by_negative"]["over_editing"]["accuracy"] == 1.0
    assert single["by_negative"]["no_op"]["accuracy"] == 0.0
    assert single["by_negative"]["partial"] == {
        "pairs": 0, "valid_pairs": 0, "invalid_pairs": 0, "accuracy": None,
        "strict_accuracy": None}
    assert (multi["pairs"], multi["valid_pairs"], multi["invalid_pairs"]) == (3, 1, 2)
    assert multi["accuracy"] == 0.5  # the tie with partial
    assert multi["strict_accuracy"] == pytest.approx(0.5 / 3)
    assert multi["by_negative"]["wrong_relation"]["invalid_pairs"] == 1
    assert multi["by_negative"]["wrong_relation"]["accuracy"] is None
    assert (overall["pairs"], overall["valid_pairs"]) == (5, 3)
    assert overall["accuracy"] == pytest.approx(1.5 / 3)


def test_the_attention_collapse_probe_compares_correct_with_over_editing():
    probe = summarise(JUDGED)["attention_collapse_probe"]
    assert probe["reward"]["pairs"] == 1 and probe["reward"]["accuracy"] == 1.0
    assert probe["over_editing_score"]["accuracy"] == 1.0  # 25 against 10
    blind = [JUDGED[0], judged("one", 1, "over_editing", edit_answer((24, 25), [BOX]))]
    assert summarise(blind)["attention_collapse_probe"]["reward"]["accuracy"] == 0.5


# ---------------------------------------------------------------- rows of an edits file


@pytest.fixture(scope="module")
def edits_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edits")
    examples = build_edit_examples(3, seed=2, test_fraction=1.0)["test"]
    write_edit_examples(folder / "test.parquet", examples)
    return folder / "test.parquet"


class ReplayJudge:
    """Answers each candidate with its own target: a perfect judge."""

    def __init__(self, rows):
        self.answers = iter(rows)

    def score(self, sources, edits, instructions):
        rows = [next(self.answers) for _ in instructions]
        assert [row.instruction for row in rows] == list(instructions)
        return [combine(parse_answer(row.edit_answer, EditAnswer),
                        parse_answer(row.quality_answer, QualityAnswer), RewardWeights(), 25)
                for row in rows]


def test_a_judge_that_gives_the_targets_scores_perfectly(edits_file):
    rows = read_edit_rows(edits_file, "test")
    summary = summarise(judge_rows(ReplayJudge(rows), rows, batch_size=4))
    assert summary["valid_json_rate"] == 1.0 and summary["invalid_by_reason"] == {}
    assert summary["region_iou"]["mean"] == 1.0
    assert summary["pairwise"]["all"]["accuracy"] == 1.0
    assert summary["pairwise"]["all"]["pairs"] == len(rows) - 3  # every candidate but correct
    assert summary["pairwise"]["single_edit"]["pairs"] > 0
    assert summary["pairwise"]["multi_edit"]["by_negative"]["partial"]["pairs"] == 2
    assert summary["attention_collapse_probe"]["reward"]["accuracy"] == 1.0


# ------------------------------------------------------------------------ benchmark files


def write_bench(folder, lines):
    for name, colour in (("src.png", "white"), ("a.png", "red"), ("b.png", "blue")):
        Image.new("RGB", (64, 64), colour).save(folder / name)
    path = folder / "bench.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return path


BENCH_LINE = {"id": "p0", "instruction": "Make the circle red.", "source": "src.png",
              "image_a": "a.png", "image_b": "b.png", "preferred": "a"}


class ColourJudge:
    """Rewards a red edited image, refuses to answer for a green one."""

    def score(self, sources, edits, instructions):
        def answer(image):
            colour = image.getpixel((0, 0))
            if colour == (0, 128, 0):
                return parse_answer("{", EditAnswer)
            return parse_answer(edit_answer((25 if colour == (255, 0, 0) else 5, 25)),
                                EditAnswer)
        quality = parse_answer(QUALITY_ANSWER, QualityAnswer)
        return [combine(answer(image), quality, RewardWeights(), 25) for image in edits]


def test_a_bench_file_is_scored_pairwise_single_and_multi_edit(tmp_path):
    Image.new("RGB", (64, 64), "green").save(tmp_path / "c.png")
    path = write_bench(tmp_path, [
        BENCH_LINE,
        {**BENCH_LINE, "id": "p1", "preferred": "b", "num_edits": 2},
        {**BENCH_LINE, "id": "p2", "image_b": "c.png", "num_edits": 3},
    ])
    pairs = read_bench_pairs(path)
    assert [p.num_edits for p in pairs] == [1, 2, 3] and pairs[0].source == tmp_path / "src.png"
    scores = score_bench(ColourJudge(), pairs, batch_size=2)
    assert scores["single_edit"]["accuracy"] == 1.0  # red preferred, red rewarded
    assert scores["multi_edit"]["valid_pairs"] == 1 and scores["multi_edit"]["accuracy"] == 0.0
    assert scores["multi_edit"]["invalid_pairs"] == 1  # the green image's answer
    assert scores["all"]["strict_accuracy"] == pytest.approx(1 / 3)


@pytest.mark.parametrize("line, message", [
    ({k: v for k, v in BENCH_LINE.items() if k != "preferred"}, r"bench.jsonl:1: missing keys "
                                                                 r"\['preferred'\]"),
    ({**BENCH_LINE, "preferred": "tie"}, "preferred must be 'a' or 'b'"),
    ({**BENCH_LINE, "image_b": "gone.png"}, "bench.jsonl:1: image_b image not found"),
])
def test_a_bad_bench_line_is_named(tmp_path, line, message):
    with pytest.raises((InputError, FileNotFoundError), match=message):
        read_bench_pairs(write_bench(tmp_path, [line]))


# --------------------------------------------------------------------- the eval command


def test_eval_command_on_the_tiny_random_judge(tiny_models_dir, edits_file, tmp_path, capsys):
    """A random judge writes no JSON: every answer is invalid, counted, and no pair ranked."""
    bench = write_bench(tmp_path, [BENCH_LINE])
    out = tmp_path / "eval" / "summary.json"
    code = main(["spatialreward", "eval", "--model", str(tiny_models_dir / "qwen3-vl"),
                 "--edits", str(edits_file), "--max-examples", "1", "--max-new-tokens", "6",
                 "--bench", str(bench), "--out", str(out)])
    assert code == 0
    summary = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == summary
    edits = summary["edits"]
    assert edits["examples"] == 1 and edits["answers"] == 2 * edits["candidates"]
    assert sum(edits["invalid_by_reason"].values()) == edits["answers"] - edits["valid_answers"]
    assert edits["valid_json_rate"] == 0.0
    assert edits["pairwise"]["all"]["valid_pairs"] == 0
    assert edits["pairwise"]["all"]["pairs"] == edits["candidates"] - 1
    assert summary["bench"]["all"]["pairs"] == 1 and summary["bench"]["all"]["accuracy"] is None


@pytest.mark.parametrize("args, message", [
    (["--edits", "/nowhere/test.parquet"], "edits file not found: /nowhere/test.parquet"),
    (["--bench", "/nowhere/bench.jsonl"], "benchmark file not found: /nowhere/bench.jsonl"),
    ([], "give --edits FILE, --bench FILE or both"),
])
def test_eval_names_a_missing_file(tiny_models_dir, capsys, args, message):
    code = main(["spatialreward", "eval", "--model", str(tiny_models_dir / "qwen3-vl"), *args])
    assert code == 2 and message in capsys.readouterr().err


def test_eval_names_a_split_without_rows(tiny_models_dir, edits_file, capsys):
    code = main(["spatialreward", "eval", "--model", str(tiny_models_dir / "qwen3-vl"),
                 "--edits", str(edits_file), "--split", "train"])
    assert code == 2 and "has no train rows" in capsys.readouterr().err


# ------------------------------------------------------------------ the package command


def test_package_writes_float16_safetensors_that_load_as_the_same_judge(tiny_models_dir,
                                                                       tmp_path, capsys):
    import torch

    from spatialrl.spatialreward.model import SpatialReward, SpatialRewardConfig

    source = tiny_models_dir / "qwen3-vl"
    out = tmp_path / "shipped"
    assert main(["spatialreward", "package", "--model", str(source), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    weights = [p.name for p in out.iterdir() if p.suffix in {".safetensors", ".bin", ".pt"}]
    assert weights == ["model.safetensors"]
    judges = [SpatialReward.from_config(SpatialRewardConfig(model=str(folder), dtype="float32"))
              for folder in (source, out)]
    for (name, trained), shipped in zip(judges[0].model.state_dict().items(),
                                        judges[1].model.state_dict().values(), strict=True):
        assert shipped.dtype == torch.float32, name
        assert torch.equal(shipped, trained.half().float()), name
    assert judges[0].encoder.tokenizer.get_vocab() == judges[1].encoder.tokenizer.get_vocab()


def test_package_names_a_folder_that_is_not_a_model(tmp_path, capsys):
    code = main(["spatialreward", "package", "--model", str(tmp_path), "--out",
                 str(tmp_path / "out")])
    assert code == 2 and "is not a model folder (no config.json)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
