"""Read a Label Studio label config into what DPAL needs: one single-choice ``Choices`` on one ``Image``.

Parsing is done by ``label_studio_sdk.label_interface.LabelInterface``; this module only checks
that the config is an image classification DPAL can serve and says precisely what is wrong when not.

Label names: the value a result carries is the Choice's ``alias`` if it has one, else its ``value``
(Label Studio's own rule). The text given to CLIP is the first entry of the Choice's
``predicted_values`` attribute (label-studio-ml's comma-separated mapping from model-side names to a
label) when present, else the Choice's ``value``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from label_studio_sdk.label_interface import LabelInterface
from label_studio_sdk.label_interface.control_tags import ChoicesTag
from label_studio_sdk.label_interface.object_tags import ImageTag

SUPPORTED_CHOICE_MODES = ("single", "single-radio")


class LabelConfigError(ValueError):
    """The label config is not a single-choice image classification DPAL can serve."""


class TaskDataError(ValueError):
    """A task lacks the image the label config points at."""


@dataclass(frozen=True)
class ClassificationConfig:
    """The one ``Choices`` control DPAL predicts, and the ``Image`` it labels."""

    from_name: str  # the Choices tag's name (result "from_name")
    to_name: str  # the Image tag's name (result "to_name")
    value_key: str  # the task data key holding the image URL, e.g. "image" for value="$image"
    labels: tuple[str, ...]  # label values as results carry them, in config order
    class_names: tuple[str, ...]  # text given to CLIP per label, same order

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.class_names):
            raise ValueError("labels and class_names must have the same length")

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def label_for(self, class_index: int) -> str:
        """The label value for a model class index."""
        if not 0 <= class_index < len(self.labels):
            raise IndexError(f"class index {class_index} out of range for {len(self.labels)} labels")
        return self.labels[class_index]

    def class_index(self, label: str) -> int:
        """The model class index of a label value (as found in an annotation result)."""
        try:
            return self.labels.index(label)
        except ValueError:
            raise LabelConfigError(
                f"label {label!r} is not a choice of {self.from_name!r} (choices: {', '.join(self.labels)})"
            ) from None


def parse_label_config(xml: str) -> ClassificationConfig:
    """Parse a label config and check it is a single-choice image classification.

    Args:
        xml: the label config as Label Studio sends it (``schema`` / ``label_config``).
    Returns:
        the classification the backend will predict.
    Raises:
        LabelConfigError: malformed XML, no or several Choices, Choices not bound to one Image,
            multiple choice, per-region or dynamic choices, nested choices, fewer than 2 or
            duplicate choices.
    """
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError("the label config is empty")
    try:
        interface = LabelInterface(xml)
    except Exception as exc:  # the SDK raises bare Exception subclasses from lxml and its own checks
        raise LabelConfigError(f"the label config is not valid XML: {exc}") from None

    tree = interface.parse(xml)[3]
    elements = [el for el in tree.iter() if _tag_is(el, "choices")]
    for element in elements:
        if not element.get("name") or not element.get("toName"):
            raise LabelConfigError(
                'every <Choices> needs a name and a toName, e.g. <Choices name="label" toName="image">'
            )
    if not elements:
        raise LabelConfigError(
            'the label config has no <Choices>; DPAL needs one <Choices toName="..."> bound to an <Image>'
        )
    if len(elements) > 1:
        names = ", ".join(repr(el.get("name")) for el in elements)
        raise LabelConfigError(
            f"the label config has {len(elements)} <Choices> ({names}); DPAL supports exactly one"
        )
    choices = [c for c in interface.controls if isinstance(c, ChoicesTag)]
    if len(choices) != 1:
        raise LabelConfigError(
            f"cannot read <Choices name={elements[0].get('name')!r}> from the label config"
        )
    control = choices[0]
    image = _bound_image(control)
    mode = control.attr.get("choice", "single")
    if mode not in SUPPORTED_CHOICE_MODES:
        raise LabelConfigError(
            f'<Choices name="{control.name}" choice="{mode}"> is not supported; DPAL predicts a single '
            'choice: use choice="single" or "single-radio"'
        )
    if str(control.attr.get("perRegion", "")).lower() == "true":
        raise LabelConfigError(f'<Choices name="{control.name}" perRegion="true"> is not supported')
    if control.attr.get("value"):
        raise LabelConfigError(
            f'<Choices name="{control.name}" value="{control.attr["value"]}"> takes its choices from task '
            "data; DPAL needs the choices written in the config"
        )

    nodes = _choice_nodes(elements[0], control.name)
    labels = [node.get("alias") or node.get("value") for node in nodes]
    missing = sum(label is None for label in labels)
    if missing:
        raise LabelConfigError(f'{missing} <Choice> in "{control.name}" without a value')
    duplicates = sorted(label for label, n in Counter(labels).items() if n > 1)
    if duplicates:
        raise LabelConfigError(f'duplicate choice values in "{control.name}": {", ".join(duplicates)}')
    if len(labels) < 2:
        raise LabelConfigError(
            f'"{control.name}" has {len(labels)} choice(s); a classifier needs at least 2 <Choice> values'
        )
    class_names = [_class_name(node) for node in nodes]
    return ClassificationConfig(
        from_name=control.name,
        to_name=image.name,
        value_key=image.value_name,
        labels=tuple(labels),
        class_names=tuple(class_names),
    )


def task_image_url(task: dict[str, Any], cfg: ClassificationConfig) -> str:
    """The image URL of a task (``task["data"][cfg.value_key]``).

    Raises:
        TaskDataError: the task has no data, no such key, or the value is not a non-empty string.
    """
    data = task.get("data") if isinstance(task, dict) else None
    task_id = task.get("id") if isinstance(task, dict) else None
    if not isinstance(data, dict):
        raise TaskDataError(f"task {task_id} has no 'data' object")
    if cfg.value_key not in data:
        keys = ", ".join(sorted(map(str, data))) or "none"
        raise TaskDataError(
            f"task {task_id} has no {cfg.value_key!r} in its data (keys: {keys}); the label config's "
            f'<Image value="${cfg.value_key}"> points there'
        )
    url = data[cfg.value_key]
    if not isinstance(url, str) or not url.strip():
        raise TaskDataError(f"task {task_id}: data[{cfg.value_key!r}] is not an image URL")
    return url.strip()


def _bound_image(control: ChoicesTag) -> ImageTag:
    """The single Image a Choices is bound to, or a LabelConfigError saying what it is bound to."""
    name = control.name
    if len(control.to_name) != 1:
        raise LabelConfigError(
            f'<Choices name="{name}" toName="{",".join(control.to_name)}"> must name one <Image>'
        )
    if not control.objects:
        raise LabelConfigError(
            f'<Choices name="{name}"> has toName="{control.to_name[0]}", but no tag has that name'
        )
    target = control.objects[0]
    if not isinstance(target, ImageTag):
        raise LabelConfigError(
            f'<Choices name="{name}"> is bound to <{target.tag} name="{target.name}">; DPAL classifies <Image> only'
        )
    if target.is_image_list:
        raise LabelConfigError(
            f'<Image name="{target.name}" valueList=...> (several images per task) is not supported'
        )
    if not target.value or not target.value_is_variable:
        raise LabelConfigError(
            f'<Image name="{target.name}" value="{target.value}"> must read the task data, e.g. value="$image"'
        )
    return target


def _choice_nodes(element: Any, control_name: str) -> list[Any]:
    """The <Choice> elements of a Choices tag, in document order (duplicates kept, unlike the SDK's dict)."""
    nodes = [el for el in element.iter() if _tag_is(el, "choice")]
    for node in nodes:
        if any(_tag_is(parent, "choice") for parent in node.iterancestors()):
            raise LabelConfigError(
                f'nested <Choice> in "{control_name}" (a taxonomy) is not supported; list flat choices'
            )
    return nodes


def _tag_is(element: Any, name: str) -> bool:
    return isinstance(element.tag, str) and element.tag.lower() == name


def _class_name(node: Any) -> str:
    for item in (node.get("predicted_values") or "").split(","):
        if item.strip():
            return item.strip()
    return (node.get("value") or node.get("alias") or "").strip()
