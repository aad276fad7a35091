"""Folders written before a setting existed still open and regenerate what they hold.

``tests/data/folder-before-positions`` was written by the tool before ``preserve.positions``
existed (``erasepro erase`` of its own ``erasepro.yaml`` recipe on ``builtin:tiny-sd``): its manifest
does not name the setting, and its hashes were taken without it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from erasepro_hub.cli import main
from erasepro_hub.manifest import earlier_forms, load_manifest, parse_manifest, recipe_sha256, recipe_sha256s
from erasepro_hub.manifest.io import SETTINGS_ADDED
from erasepro_hub.verification import verify

EARLIER = Path(__file__).parent / "data" / "folder-before-positions"


@pytest.fixture
def earlier(tmp_path) -> Path:
    return Path(shutil.copytree(EARLIER, tmp_path / "earlier"))


def test_the_stored_folder_predates_the_setting():
    data = yaml.safe_load((EARLIER / "erasepro.yaml").read_text())
    assert "positions" not in data["preserve"] and "outputs" in data
    assert data["preserve"]["concepts"], "the setting only matters with preserve prompts"


def test_a_folder_written_before_preserve_positions_opens_and_verifies(earlier, capsys):
    manifest = load_manifest(earlier)
    assert manifest.preserve.positions == "window"  # what the tool did then, not today's default
    assert recipe_sha256(manifest) != manifest.outputs.recipe_sha256  # today's form of the hash ...
    assert manifest.outputs.recipe_sha256 in recipe_sha256s(manifest)  # ... and the form it was taken in
    assert main(["inspect", str(earlier)]) == 0
    assert "integrity    ok" in capsys.readouterr().out
    report = verify(earlier)
    assert report.ok, report.problems


def test_spelling_out_the_earlier_behaviour_changes_nothing(earlier):
    text = (earlier / "erasepro.yaml").read_text()
    (earlier / "erasepro.yaml").write_text(text.replace("preserve:\n", "preserve:\n  positions: window\n", 1))
    assert main(["inspect", str(earlier)]) == 0


@pytest.mark.parametrize("value", ["auto", "prompt"])
def test_another_value_in_an_earlier_folder_is_an_edit(earlier, value, capsys):
    text = (earlier / "erasepro.yaml").read_text()
    (earlier / "erasepro.yaml").write_text(text.replace("preserve:\n", f"preserve:\n  positions: {value}\n", 1))
    assert main(["inspect", str(earlier)]) == 1
    assert "was edited after the erasure was made" in capsys.readouterr().err


def test_a_recipe_that_leaves_a_setting_out_takes_the_default():
    recipe = parse_manifest(
        "schema_version: 1\nbase_model: {id: builtin:tiny-sd}\n"
        "concepts: [{target: a cat, anchor: an animal}]\nprompts: {templates: ['{}']}\n"
    )
    assert recipe.preserve.positions == "auto" and recipe.uce.tokens == "last-token"


def test_earlier_forms_drop_the_newest_settings_first_and_stop_at_a_changed_one():
    before = {section: {key: value, "other": 1} for (section, key), value in SETTINGS_ADDED.items()}
    forms = list(earlier_forms(before))
    assert len(forms) == len(SETTINGS_ADDED) + 1
    assert forms[-1] == {section: {"other": 1} for section, _ in SETTINGS_ADDED}
    (old_section, old_key), *_, (new_section, new_key) = SETTINGS_ADDED
    assert old_key in forms[1][old_section] and new_key not in forms[1][new_section]
    changed = {**before, new_section: {new_key: "something else", "other": 1}}
    assert list(earlier_forms(changed)) == [changed]  # a value the earlier tool never wrote
