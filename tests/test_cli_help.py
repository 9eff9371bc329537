"""Every default the command line states is the settings' own: the help cannot drift from the code."""

from __future__ import annotations

import argparse
import dataclasses
import re

import pytest

from care_mla.cli import build_parser
from care_mla.evaluation.sweep import SweepSettings
from care_mla.healing.settings import HealSettings
from care_mla.pipeline.selection import KEY_EMPHASIS_GRID, OBJECTIVE_CHOICES, ROPE_SHARES
from care_mla.settings import ConvertSettings

SETTINGS = {
    "convert": ConvertSettings(),
    "sweep": SweepSettings(),
    "heal": HealSettings(converted="-", teacher="-", out="-", tokens=1),
}


def subcommand(name: str) -> argparse.ArgumentParser:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices[name]


def option_help(parser: argparse.ArgumentParser, option: str) -> str:
    (action,) = [a for a in parser._actions if option in a.option_strings]
    return " ".join((action.help % {"default": action.default}).split())


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_parser_defaults_are_the_settings_defaults(command):
    settings, parser = SETTINGS[command], subcommand(command)
    fields = {f.name for f in dataclasses.fields(settings)}
    checked = 0
    for action in parser._actions:
        if action.dest not in fields or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            continue
        expected = getattr(settings, action.dest)
        default = list(action.default) if isinstance(action.default, (list, tuple)) else action.default
        assert default == (list(expected) if isinstance(expected, tuple) else expected), action.option_strings
        checked += 1
    assert checked >= 8


@pytest.mark.parametrize("command", sorted(SETTINGS))
def test_every_stated_default_is_true(command):
    """"(default: X)" in a help line says what the settings hold when the option is left out."""
    settings, parser = SETTINGS[command], subcommand(command)
    stated = 0
    for action in parser._actions:
        if not action.option_strings or not action.help or action.help == argparse.SUPPRESS:
            continue
        text = " ".join((action.help % {"default": action.default}).split())
        match = re.search(r"default: ([^)]+)\)?$", text)
        if not match or not hasattr(settings, action.dest) or action.default is None:
            continue
        value = getattr(settings, action.dest)
        shown = ",".join(map(str, value)) or "none" if isinstance(value, tuple) else str(value)
        assert match.group(1) == shown, (action.option_strings, text)
        stated += 1
    assert stated >= 8


def test_defaults_that_depend_on_other_options_are_stated_truly():
    convert, default = subcommand("convert"), ConvertSettings()
    latent = option_help(convert, "--latent")
    assert default.latent == "joint" and "joint: one K/V latent (default for care_mla" in latent
    assert ConvertSettings(method="svd").latent == "separate" and "svd, asvd and svd-llm, build separate" in latent
    assert ConvertSettings(format="deepseek").latent == "decoupled" and "(always for deepseek)" in latent

    allocation = option_help(convert, "--allocation")
    assert "Default: uniform for joint and decoupled latents" in allocation and "adjusted for separate" in allocation
    assert default.allocation == "uniform" and ConvertSettings(latent="decoupled").allocation == "uniform"
    assert ConvertSettings(latent="separate").allocation == "adjusted"

    objective = option_help(convert, "--objective")
    assert "Default: auto for joint/decoupled latents of care below parity, activation otherwise" in objective
    assert ConvertSettings(kv_fraction=1.0).objective == "activation"  # exact whatever the objective
    assert default.objective == "auto" and ConvertSettings(format="deepseek").objective == "auto"
    assert ConvertSettings(latent="separate").objective == "activation"
    assert ConvertSettings(method="mha2mla").objective == "activation"
    assert set(OBJECTIVE_CHOICES) == {"activation", "value", "attention"}
    assert "auto (activation, value or attention, by calibration loss)" in objective

    assert KEY_EMPHASIS_GRID == (1.0, 2.0, 4.0) and "auto tries 1, 2, 4" in option_help(convert, "--key-emphasis")

    rope = option_help(convert, "--rope-dim")
    assert ConvertSettings(format="deepseek").rope_dim is None  # chosen by calibration loss
    assert ROPE_SHARES == (1 / 6, 1 / 4, 1 / 3, 1 / 2) and "a sixth, a quarter, a third and a half" in rope

    refit = option_help(convert, "--refit-output")
    assert "default: on for care below parity" in refit
    assert default.refit_output is True and ConvertSettings(kv_fraction=1.0).refit_output is False
    assert ConvertSettings(method="svd").refit_output is False

    heal = subcommand("heal")
    assert "default 5e-5, with --lora 2e-4" in option_help(heal, "--lr")
    h = dict(converted="-", teacher="-", out="-", tokens=1)
    assert HealSettings(**h).lr == 5e-5 and HealSettings(**h, lora=True).lr == 2e-4
    assert "default 16" in option_help(heal, "--lora-rank") and HealSettings(**h, lora=True).lora_rank == 16


def test_demo_defaults_match_its_api():
    import inspect

    from care_mla.demo import run_demo

    demo = subcommand("demo")
    assert demo.get_default("kv_fraction") == inspect.signature(run_demo).parameters["kv_fraction"].default
    assert demo.get_default("out") == inspect.signature(run_demo).parameters["out"].default


def test_zero_shot_help_names_the_paper_suite():
    from care_mla.cli import ZERO_SHOT_NAMES
    from care_mla.evaluation.standard_tasks import PAPER_TASKS

    assert all(task in ZERO_SHOT_NAMES for task in PAPER_TASKS)
