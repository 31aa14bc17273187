"""backend.labelconfig: real Label Studio image classification configs, and each refusal's message."""

from __future__ import annotations

import pytest

from backend.labelconfig import (
    ClassificationConfig,
    LabelConfigError,
    TaskDataError,
    parse_label_config,
    task_image_url,
)

# Label Studio's shipped template: annotation_templates/computer-vision/image-classification/config.yml
LS_TEMPLATE = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="choice" toName="image">
    <Choice value="Adult content"/>
    <Choice value="Weapons" />
    <Choice value="Violence" />
  </Choices>
</View>
"""

# The shape of Label Studio's docs / ML-backend examples: header, radio buttons, inline layout.
LS_RADIO = """
<View>
  <Header value="Choose the class of the image"/>
  <Image name="img" value="$photo" zoom="true" zoomControl="true"/>
  <Choices name="label" toName="img" choice="single-radio" showInline="true" required="true">
    <Choice value="Airplane" hint="a flying vehicle"/>
    <Choice value="Car"/>
  </Choices>
</View>
"""

# Choices grouped in Views (allowed by Label Studio), predicted_values and an alias.
GROUPED = """
<View>
  <Image name="image" value="$image"/>
  <Choices name="pet" toName="image">
    <View style="display: flex">
      <Choice value="Dog" predicted_values=" dog , puppy"/>
      <Choice value="Cat" predicted_values="cat,kitten"/>
    </View>
    <View>
      <Choice value="Small mammal" alias="small"/>
      <Choice value="Bird"/>
    </View>
  </Choices>
  <TextArea name="comment" toName="image"/>
</View>
"""


def test_label_studio_template() -> None:
    cfg = parse_label_config(LS_TEMPLATE)
    assert cfg == ClassificationConfig(
        from_name="choice",
        to_name="image",
        value_key="image",
        labels=("Adult content", "Weapons", "Violence"),
        class_names=("Adult content", "Weapons", "Violence"),
    )
    assert cfg.num_classes == 3
    assert cfg.label_for(1) == "Weapons"
    assert cfg.class_index("Violence") == 2


def test_single_radio_and_other_value_key() -> None:
    cfg = parse_label_config(LS_RADIO)
    assert (cfg.from_name, cfg.to_name, cfg.value_key) == ("label", "img", "photo")
    assert cfg.labels == ("Airplane", "Car")
    assert cfg.class_names == ("Airplane", "Car")  # hint is a tooltip, not a class name


def test_grouped_choices_predicted_values_and_alias() -> None:
    cfg = parse_label_config(GROUPED)
    # Results carry the alias when there is one (Label Studio's rule); CLIP gets readable text.
    assert cfg.labels == ("Dog", "Cat", "small", "Bird")
    assert cfg.class_names == ("dog", "cat", "Small mammal", "Bird")
    assert cfg.label_for(0) == "Dog"
    assert cfg.label_for(2) == "small"


def test_label_for_and_class_index_out_of_range() -> None:
    cfg = parse_label_config(LS_TEMPLATE)
    with pytest.raises(IndexError):
        cfg.label_for(3)
    with pytest.raises(IndexError):
        cfg.label_for(-1)
    with pytest.raises(LabelConfigError, match="'Cats' is not a choice of 'choice'"):
        cfg.class_index("Cats")


def _config(choices: str, *, objects: str = '<Image name="image" value="$image"/>') -> str:
    return f"<View>{objects}{choices}</View>"


TWO = '<Choice value="a"/><Choice value="b"/>'


@pytest.mark.parametrize(
    ("xml", "message"),
    [
        ("", "empty"),
        ("<View><Image name='image' value='$image'>", "not valid XML"),
        (_config(""), "no <Choices>"),
        (
            _config(
                f'<Choices name="c1" toName="image">{TWO}</Choices><Choices name="c2" toName="image">{TWO}</Choices>'
            ),
            "2 <Choices> ('c1', 'c2')",
        ),
        (
            _config(
                f'<Choices name="c" toName="txt">{TWO}</Choices>', objects='<Text name="txt" value="$text"/>'
            ),
            'bound to <Text name="txt">',
        ),
        (_config(f'<Choices name="c" toName="image" choice="multiple">{TWO}</Choices>'), 'choice="multiple"'),
        (_config('<Choices name="c" toName="image"><Choice value="a"/></Choices>'), "1 choice(s)"),
        (_config('<Choices name="c" toName="image"></Choices>'), "0 choice(s)"),
        (
            _config(
                '<Choices name="c" toName="image"><Choice value="a"/><Choice value="b"/><Choice value="a"/></Choices>'
            ),
            'duplicate choice values in "c": a',
        ),
        (_config(f'<Choices name="c" toName="nothing">{TWO}</Choices>'), 'toName="nothing", but no tag'),
        (_config(f'<Choices toName="image">{TWO}</Choices>'), "needs a name and a toName"),
        (
            _config(
                f'<Choices name="c" toName="image,image2">{TWO}</Choices>',
                objects='<Image name="image" value="$image"/><Image name="image2" value="$image2"/>',
            ),
            "must name one <Image>",
        ),
        (_config(f'<Choices name="c" toName="image" perRegion="true">{TWO}</Choices>'), "perRegion"),
        (
            _config('<Choices name="c" toName="image" value="$options"></Choices>'),
            "takes its choices from task data",
        ),
        (
            _config(
                '<Choices name="c" toName="image"><Choice value="a"><Choice value="a1"/></Choice><Choice value="b"/></Choices>'
            ),
            "nested <Choice>",
        ),
        (
            _config(
                f'<Choices name="c" toName="image">{TWO}</Choices>',
                objects='<Image name="image" valueList="$images"/>',
            ),
            "valueList",
        ),
        (
            _config(
                f'<Choices name="c" toName="image">{TWO}</Choices>',
                objects='<Image name="image" value="https://x/a.png"/>',
            ),
            'must read the task data, e.g. value="$image"',
        ),
    ],
    ids=[
        "empty",
        "malformed",
        "no-choices",
        "two-choices",
        "bound-to-text",
        "multiple",
        "one-choice",
        "zero-choices",
        "duplicates",
        "dangling-toName",
        "no-name",
        "two-targets",
        "per-region",
        "dynamic",
        "nested",
        "value-list",
        "literal-image",
    ],
)
def test_bad_configs(xml: str, message: str) -> None:
    with pytest.raises(LabelConfigError) as info:
        parse_label_config(xml)
    assert message in str(info.value)


def test_task_image_url() -> None:
    cfg = parse_label_config(LS_RADIO)
    task = {"id": 7, "data": {"photo": " /data/upload/1/a.png "}}
    assert task_image_url(task, cfg) == "/data/upload/1/a.png"
    with pytest.raises(TaskDataError, match=r"task 7 has no 'photo' in its data \(keys: image\)"):
        task_image_url({"id": 7, "data": {"image": "x"}}, cfg)
    with pytest.raises(TaskDataError, match="no 'data' object"):
        task_image_url({"id": 7}, cfg)
    with pytest.raises(TaskDataError, match="is not an image URL"):
        task_image_url({"id": 7, "data": {"photo": ""}}, cfg)
    with pytest.raises(ValueError):  # TaskDataError is a ValueError
        task_image_url({"id": 7, "data": {"photo": 3}}, cfg)
