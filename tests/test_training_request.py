"""A training request is declared once: the admin API, the trainer, the page and both CLIs agree.

``ml.config.TrainingOptions`` declares the knobs; this checks that every place a knob can be
typed or is read derives its name, limits, default and help from it.
"""

from __future__ import annotations

import argparse
import math
from html.parser import HTMLParser
from typing import Any

import pytest
from flask.testing import FlaskClient
from pydantic import BaseModel, ValidationError

from cli.main import build_parser as cxr_parser
from cli.train import build_parser as local_train_parser
from ml.config import TrainConfig, TrainingOptions, choices, limits, value_type
from worker.jobs import TrainingRequest

KNOBS = tuple(TrainingOptions.model_fields)


def subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name``."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            found: argparse.ArgumentParser = action.choices[name]
            return found
    raise AssertionError(f"no subcommand {name}")


def actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The parser's actions by destination."""
    return {a.dest: a for a in parser._actions}


def boundaries(name: str) -> tuple[list[float], list[float]]:
    """Values a knob must accept and values it must refuse, from its declared limits."""
    low, high, exclusive = limits(TrainingOptions, name)
    kind = value_type(TrainingOptions, name)
    step = 1 if kind is int else 1e-9
    good, bad = [], []
    if low is not None:
        good.append(low + step if exclusive else low)
        bad.append(low if exclusive else low - step)
    if high is not None:
        good.append(high)
        bad.append(high + (1 if kind is int else 1e-6))
    cast = int if kind is int else float
    return [cast(v) for v in good], [cast(v) for v in bad]


def test_every_knob_is_declared_with_help_and_a_default() -> None:
    assert {
        "input_size", "epochs_head", "epochs_finetune", "learning_rate_head",
        "learning_rate_finetune", "finetune_blocks", "batch_size", "augment", "site_augment",
        "intensity", "patience", "seed",
        "max_images_per_class", "target_sensitivity",
    } == set(KNOBS)  # fmt: skip
    for name in KNOBS:
        info = TrainingOptions.model_fields[name]
        assert info.description, name
        assert info.title, name


@pytest.mark.parametrize("model", [TrainingRequest, TrainConfig])
def test_the_api_and_the_trainer_inherit_every_knob(model: type[BaseModel]) -> None:
    for name in KNOBS:
        ours, declared = model.model_fields[name], TrainingOptions.model_fields[name]
        assert ours.default == declared.default, name
        assert ours.metadata == declared.metadata, name  # the limits
        assert ours.description == declared.description, name
    # The trainer takes exactly what the API hands it.
    assert set(TrainingRequest().knobs()) == set(KNOBS)
    assert TrainConfig.from_dict(TrainingRequest().knobs()).model_dump(include=set(KNOBS)) == (
        TrainingRequest().knobs()
    )


NUMBERS = [n for n in KNOBS if value_type(TrainingOptions, n) in (int, float)]
CHOICES = [n for n in KNOBS if value_type(TrainingOptions, n) is str]
# Phase 2 on, so that no single knob at its limit leaves nothing to train.
TRAINABLE = {"epochs_head": 1, "epochs_finetune": 1, "finetune_blocks": 1, "base_weights": None}


@pytest.mark.parametrize("name", NUMBERS)
def test_the_api_and_the_trainer_share_the_limits(name: str) -> None:
    good, bad = boundaries(name)
    assert good and bad, name
    for value in good:
        TrainingRequest.model_validate({name: value})
        TrainConfig.from_dict(TRAINABLE | {name: value})
    for value in bad:
        with pytest.raises(ValidationError, match=name):
            TrainingRequest.model_validate({name: value})
        with pytest.raises(ValueError, match=name):
            TrainConfig.from_dict(TRAINABLE | {name: value})


@pytest.mark.parametrize("name", CHOICES)
def test_the_api_the_trainer_and_both_command_lines_share_the_choices(name: str) -> None:
    allowed = choices(TrainingOptions, name)
    assert len(allowed) >= 2 and TrainingOptions.model_fields[name].default in allowed
    for value in allowed:
        assert TrainingRequest.model_validate({name: value}).knobs()[name] == value
        assert TrainConfig.from_dict(TRAINABLE | {name: value}).to_dict()[name] == value
    for value in ("", "other", allowed[0].upper(), 1):
        with pytest.raises(ValidationError, match=name):
            TrainingRequest.model_validate({name: value})
        with pytest.raises(ValueError, match=name):
            TrainConfig.from_dict(TRAINABLE | {name: value})
    flag = "--" + name.replace("_", "-")
    remote = actions(subparser(cxr_parser(), "train"))[name]
    local = actions(local_train_parser())[name]
    assert tuple(remote.choices or ()) == tuple(local.choices or ()) == allowed
    args = local_train_parser().parse_args(["--dataset", "d", "--out", "o", flag, allowed[-1]])
    assert getattr(args, name) == allowed[-1]
    assert getattr(cxr_parser().parse_args(["train", flag, allowed[-1]]), name) == allowed[-1]


def test_both_command_lines_offer_every_knob_the_same_way() -> None:
    remote = actions(subparser(cxr_parser(), "train"))
    local = actions(local_train_parser())
    for name in KNOBS:
        declared = TrainingOptions.model_fields[name]
        for parser_actions in (remote, local):
            action = parser_actions[name]
            assert action.option_strings[0] == "--" + name.replace("_", "-")
            assert declared.description is not None and declared.description in str(action.help)
        assert remote[name].option_strings == local[name].option_strings, name
        assert remote[name].default is None, name  # unset: the service's default applies
        assert local[name].default == declared.default, name
    # The two spellings of one option that the two command lines used to differ on.
    for argv in (["--lr-head", "0.5"], ["--learning-rate-head", "0.5"]):
        remote_args = cxr_parser().parse_args(["train", *argv])
        local_args = local_train_parser().parse_args(["--dataset", "d", "--out", "o", *argv])
        assert remote_args.learning_rate_head == local_args.learning_rate_head == 0.5


def test_cxr_train_sends_every_field_of_the_request() -> None:
    args = cxr_parser().parse_args(["train"])
    sendable = set(vars(args)) & set(TrainingRequest.model_fields)
    assert sendable == set(TrainingRequest.model_fields)


class _Inputs(HTMLParser):
    """Collects the attributes of every <input> of the page."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs: dict[str, dict[str, str | None]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "input" and found.get("name"):
            self.inputs[str(found["name"])] = found


def test_the_admin_form_shows_the_declared_limits_and_defaults(client: FlaskClient) -> None:
    page = _Inputs()
    page.feed(client.get("/admin").get_data(as_text=True))
    shown = [name for name in KNOBS if name in page.inputs]
    assert len(shown) >= 9
    for name in shown:
        attrs: dict[str, Any] = page.inputs[name]
        low, high, _ = limits(TrainingOptions, name)
        default = TrainingOptions.model_fields[name].default
        assert attrs["type"] == "number"
        assert float(attrs["min"]) == low, name
        assert (float(attrs["max"]) if attrs.get("max") else None) == high, name
        if default is None:
            assert "value" not in attrs, name
        else:
            assert math.isclose(float(attrs["value"]), default), name
