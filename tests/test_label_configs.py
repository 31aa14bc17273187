"""The shipped label configs are valid and have the one shape DPAL supports.

Shape: exactly one single-choice ``<Choices>`` bound to exactly one ``<Image>``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import ChoicesTag
from label_studio_sdk.label_interface.object_tags import ImageTag

from backend.labelconfig import parse_label_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "label_config"
CONFIGS = sorted(CONFIG_DIR.glob("*.xml"))
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


def _interface(path: Path) -> LabelInterface:
    return LabelInterface(path.read_text(encoding="utf-8"))


def test_expected_configs_are_shipped() -> None:
    names = {p.name for p in CONFIGS}
    assert {"image_classification.xml", "animal_mnist.xml", "with_predicted_values.xml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_is_valid(path: Path) -> None:
    li = _interface(path)
    li.validate()  # raises with a message naming the problem
    assert li.is_valid


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_one_single_choice_bound_to_an_image(path: Path) -> None:
    li = _interface(path)
    choices = [c for c in li.controls if isinstance(c, ChoicesTag)]
    assert len(choices) == 1, f"{path.name}: expected one <Choices>, found {len(choices)}"
    assert len(li.controls) == 1, f"{path.name}: unexpected extra control tags"
    control = choices[0]
    # Label Studio's default for `choice` is single; multiple is not supported.
    assert control.attr.get("choice", "single") in {"single", "single-radio"}
    assert len(control.to_name) == 1
    images = [o for o in li.objects if isinstance(o, ImageTag)]
    assert len(images) == 1, f"{path.name}: expected one <Image>, found {len(images)}"
    assert control.to_name[0] == images[0].name
    assert images[0].value == "$image"
    assert len(control.labels) >= 2
    assert len(set(control.labels)) == len(control.labels)


def test_animal_mnist_classes() -> None:
    li = _interface(CONFIG_DIR / "animal_mnist.xml")
    (control,) = li.controls
    assert control.labels == ANIMAL_CLASSES


def test_predicted_values_mapping() -> None:
    li = _interface(CONFIG_DIR / "with_predicted_values.xml")
    (control,) = li.controls
    mapping = {}
    for value, tag in control.labels_attrs.items():
        for name in tag.attr.get("predicted_values", value).split(","):
            mapping[name.strip()] = value
    assert mapping["dog"] == "Dog"
    assert mapping["puppy"] == "Dog"
    assert mapping["guinea pig"] == "Small mammal"
    assert mapping["Bird"] == "Bird"  # no predicted_values: the value itself
    # A model-side name must not point at two choices.
    names = [
        n.strip()
        for tag in control.labels_attrs.values()
        for n in tag.attr.get("predicted_values", tag.attr["value"]).split(",")
    ]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_parses_through_backend(path: Path) -> None:
    cfg = parse_label_config(path.read_text(encoding="utf-8"))
    li = _interface(path)
    (control,) = li.controls
    assert cfg.from_name == control.name
    assert cfg.to_name == control.to_name[0]
    assert cfg.value_key == "image"
    assert list(cfg.labels) == control.labels


def test_backend_reads_predicted_values() -> None:
    cfg = parse_label_config((CONFIG_DIR / "with_predicted_values.xml").read_text(encoding="utf-8"))
    assert cfg.labels == ("Dog", "Cat", "Small mammal", "Bird")
    # The text for CLIP is the first predicted value, else the choice value.
    assert cfg.class_names == ("dog", "cat", "rabbit", "Bird")
