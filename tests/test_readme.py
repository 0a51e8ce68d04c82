"""Every command the README shows exists and takes the flags it is shown with; launch examples dry-run."""
import argparse
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def readme_commands() -> list[str]:
    """`python ...` commands from code blocks (with `\\` continuations) and from inline code spans."""
    blocks = re.findall(r"```[a-z]*\n(.*?)```", README, flags=re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"```.*?```", "", README, flags=re.S)
    spans = [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    commands = [re.sub(r"^(\w+=\S+ )+", "", c.strip()) for c in lines + spans]  # drop leading VAR=value
    return sorted({c for c in commands if c.startswith("python ")})


def flags(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))


def subcommand_options(parser: argparse.ArgumentParser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return {o for action in sub._actions for o in action.option_strings}


def pipeline_options(command: str) -> set[str]:
    from pipeline.cli import build_parser

    return subcommand_options(build_parser([command]), command)


def launch_options(command: str) -> set[str]:
    from launch.cli import build_parser

    return subcommand_options(build_parser(), command)


def help_options(target: str, is_module: bool, capsys, monkeypatch) -> set[str]:
    """The flags in `--help` of a script or module, run in this process (no second torch import)."""
    monkeypatch.setattr(sys, "argv", [target, "--help"])
    monkeypatch.syspath_prepend(str(REPO))
    with pytest.raises(SystemExit) as done:
        if is_module:
            # runpy warns when the module is already imported (an earlier test did); run it fresh
            monkeypatch.delitem(sys.modules, target, raising=False)
            runpy.run_module(target, run_name="__main__")
        else:
            runpy.run_path(str(REPO / target), run_name="__main__")
    assert done.value.code in (0, None)
    return flags(capsys.readouterr().out)


def test_the_readme_shows_commands():
    commands = readme_commands()
    assert len(commands) >= 15 and any(c.startswith("python -m launch") for c in commands)


@pytest.mark.parametrize("command", readme_commands())
def test_readme_command_takes_its_flags(command, capsys, monkeypatch):
    words = command.split()
    module = words[2] if words[1] == "-m" else words[1]
    before, _, after = command.partition(" -- ")
    if module in ("pipeline", "launch"):
        sub = words[3]
        choices = sub.strip("{}").split(",")
        for name in choices:
            if module == "launch":
                assert flags(before) <= launch_options(name), command
                assert flags(after) <= pipeline_options(name), command
            else:
                assert flags(command) <= pipeline_options(name), command
    else:
        assert flags(command) <= help_options(module, words[1] == "-m", capsys, monkeypatch), command


LAUNCH_EXAMPLES = [c for c in readme_commands()
                   if c.startswith("python -m launch") and " -- " in c and not set("{<[") & set(c)]


@pytest.mark.parametrize("command", LAUNCH_EXAMPLES)
def test_launch_examples_dry_run(command, capsys):
    from launch.cli import main

    argv = shlex.split(command)[3:]
    cut = argv.index("--")
    assert main([*argv[:cut], "--cluster", "slurm", "--dry-run", *argv[cut:]]) == 0
    assert capsys.readouterr().out.startswith("#!/bin/bash")
