"""``sal-ros``: each command's --help shows that command's own options, and only its module is imported."""
import argparse
import importlib
import json
import subprocess
import sys

import pytest

from sal_ros import cli

CASES = [[name] for name in cli.COMMANDS] + [["bench", name] for name in cli.BENCHES]


def _module_of(words):
    table = cli.BENCHES if words[0] == "bench" else cli.COMMANDS
    return table[words[-1]][0]


def _own_options(module_name):
    """Option strings the command module adds (read from the module, so the test follows it)."""
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(add_help=False)
    module.add_arguments(parser)
    shown = [a for a in parser._actions if a.help != argparse.SUPPRESS]
    options = [s for a in shown for s in a.option_strings if s.startswith("--")]
    positionals = [a.dest for a in shown if not a.option_strings]
    return options, positionals


@pytest.mark.parametrize("words", CASES, ids=" ".join)
def test_command_help_lists_its_own_options(words, capsys):
    options, positionals = _own_options(_module_of(words))
    assert options or positionals, f"{words}: the module adds no arguments"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(words + ["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: sal-ros {' '.join(words)} ")
    missing = [o for o in options if o not in text]
    assert not missing, f"sal-ros {' '.join(words)} --help lacks {missing}:\n{text}"


def test_help_after_other_options_still_shows_command_options(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "codec", "--points", "10", "-h"])
    assert "--reference-repeats" in capsys.readouterr().out


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in [*cli.COMMANDS, "bench"]:
        assert f"    {name}" in text


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'frobnicate'" in capsys.readouterr().err


def test_only_the_chosen_command_module_is_imported():
    """In a fresh interpreter: `bench codec --help` imports sal_ros.bench.codec and no other command module."""
    code = (
        "import sys, json\n"
        "from sal_ros import cli\n"
        "try:\n"
        "    cli.main(['bench', 'codec', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "mods = [m for m, _ in [*cli.COMMANDS.values(), *cli.BENCHES.values()]]\n"
        "print(json.dumps([m for m in mods if m in sys.modules]), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--points" in done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == ["sal_ros.bench.codec"]


@pytest.mark.parametrize("argv, message", [
    (["run", "--no-segmenter"], "sal-ros run: nothing to run"),
    (["replay", "/nonexistent/bag"], "sal-ros replay: /nonexistent/bag does not exist"),
])
def test_run_and_replay_report_a_bad_invocation_on_stderr_with_exit_1(argv, message, capsys):
    """Like every other command: the reason on stderr, exit status 1 (2 is argparse's own usage error)."""
    if argv[0] == "replay":
        from conftest import require_rclpy

        require_rclpy()  # replay imports rclpy before it looks at the bag
    assert cli.main(argv) == 1
    out, err = capsys.readouterr()
    assert message in err and message not in out
