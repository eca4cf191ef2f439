from pathlib import Path

import pytest

from vlp_cli import VlpError
from vlp_cli.config import load_recipe, recipe_from_dict, recipe_to_dict, save_recipe


def test_builtin_recipe_loads_by_name_and_path() -> None:
    by_name = load_recipe("tiny")
    by_path = load_recipe(Path(__file__).parent.parent / "recipes" / "tiny.yaml")
    assert by_name == by_path
    assert by_name.pretrain.train.steps > 0


def test_unknown_key_names_key_and_closest(tmp_path: Path) -> None:
    p = tmp_path / "r.yaml"
    p.write_text("pretrain:\n  train:\n    stepz: 3\n")
    with pytest.raises(VlpError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert "pretrain.train.stepz" in msg and "'steps'" in msg and str(p) in msg


def test_unknown_section() -> None:
    with pytest.raises(VlpError, match="unknown key 'pretrian'.*'pretrain'"):
        recipe_from_dict({"pretrian": {}})


def test_wrong_type_and_choice() -> None:
    with pytest.raises(VlpError, match="'pretrain.train.steps' must be int"):
        recipe_from_dict({"pretrain": {"train": {"steps": "many"}}})
    with pytest.raises(VlpError, match="must be one of no, fp16, bf16.*'bf16'"):
        recipe_from_dict({"vqa": {"train": {"mixed_precision": "bf61"}}})
    with pytest.raises(VlpError, match="needs 2 values"):
        recipe_from_dict({"vqa": {"train": {"betas": [0.9]}}})


def test_overrides_parse_yaml_values() -> None:
    r = load_recipe("tiny", ["pretrain.train.lr=3e-4", "data.image_region=false",
                             "pretrain.text=[caption]", "vqa.train.betas=[0.9, 0.98]"])
    assert r.pretrain.train.lr == pytest.approx(3e-4)
    assert r.data.image_region is False
    assert r.oscar.text == ["caption"]  # a key that moved to the objective's own section
    assert r.vqa.train.betas == (0.9, 0.98)
    with pytest.raises(VlpError, match="KEY=VALUE"):
        load_recipe("tiny", ["pretrain.train.lr"])
    with pytest.raises(VlpError, match="unknown key 'data.max_regionz'"):
        load_recipe("tiny", ["data.max_regionz=3"])


def test_saved_recipe_round_trips(tmp_path: Path) -> None:
    r = load_recipe("tiny", ["seed=7"])
    save_recipe(r, tmp_path)
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == r
    assert recipe_to_dict(again)["seed"] == 7


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("pretrain: [1, 2\n")
    with pytest.raises(VlpError, match="not valid YAML"):
        load_recipe(p)
    with pytest.raises(VlpError, match="not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")))
def test_every_shipped_recipe_is_valid(path: Path) -> None:
    r = load_recipe(path)
    assert r.name == path.stem


def test_moved_keys_are_read_under_their_new_names_and_set_wins() -> None:
    from vlp_cli import VlpError

    assert load_recipe("oscar-base", ["pretrain.pollute_prob=0.3"]).oscar.pollute_prob == 0.3
    old_file = {"pretrain": {"mask_prob": 0.1}, "corpus": {"max_answers": 10}}
    r = load_recipe(None, ["pretrain.mask_prob=0.2"], base=old_file)
    assert r.oscar.mask_prob == 0.2 and r.vqa.max_answers == 10
    with pytest.raises(VlpError, match="'pretrain.mask_prob' .* and 'oscar.mask_prob' .* "
                                       "disagree"):
        load_recipe(None, [], base={"pretrain": {"mask_prob": 0.1}, "oscar": {"mask_prob": 0.2}})


def test_a_bad_set_is_blamed_on_set_not_on_the_recipe_file() -> None:
    """--set errors name --set (over the recipe they change); the file's own errors name it."""
    from vlp_cli import VlpError
    from vlp_cli.config import load_recipe

    with pytest.raises(VlpError, match=r"^--set \(over tiny\): unknown key 'vqa.train.stepz'"):
        load_recipe("tiny", ["vqa.train.stepz=3"])
    with pytest.raises(VlpError, match=r"^--set \(over recipe\): 'vqa.train.steps' must be"):
        load_recipe(None, ["vqa.train.steps=0"], base={})
    with pytest.raises(VlpError, match=r"^stored.yaml: unknown key"):
        load_recipe(None, ["vqa.train.steps=3"], base={"vqa": {"bogus": 1}},
                    source="stored.yaml")
