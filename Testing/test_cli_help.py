"""What a new user reads first: `mmcafnet --help`, each command's options, `info` and `models`."""

from __future__ import annotations

import argparse
import json

import pytest
from test_inference_support import write_untrained_checkpoint

from MMCAFNetLib.cli import COMMANDS, build_parser, main


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_command_is_explained_in_its_help(command, capsys) -> None:
    parser = command_parsers()[command]
    hidden = [a.option_strings or a.dest for a in parser._actions
              if not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS)]
    assert not hidden, f"mmcafnet {command}: options without help: {hidden}"
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    assert "``" not in text
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text


def test_top_level_help_is_plain_text_naming_the_thread_setting(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    assert "MMCAFNET_THREADS" in text and "mmcafnet COMMAND --help" in text
    assert all(name in text for name in COMMANDS)


def test_info_counts_parameters_as_models_does_and_labels_validation_metrics(tmp_path, capsys) -> None:
    ckpt = write_untrained_checkpoint(tmp_path / "u.pt")
    assert main(["info", str(ckpt), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert main(["models", "--json", "--model", "mmcafnet-lite", "--window", "8", "32", "32"]) == 0
    listed = json.loads(capsys.readouterr().out)[0]
    assert info["parameters"] == listed["parameters"]  # both binary heads: the same count
    assert main(["info", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert f"({info['parameters']:,} parameters)" in text
    assert "validation metrics:" in text and "data fingerprint: untrained" in text and "SHA-256 of the cohort rows" in text


def test_models_says_which_variant_it_is_counting(capsys) -> None:
    assert main(["models", "--model", "mmcafnet-lite", "--model", "tabular-kan", "--window", "8", "32", "32"]) == 0
    captured = capsys.readouterr()
    assert "counting mmcafnet-lite (1/2)" in captured.err and "counting tabular-kan (2/2)" in captured.err
    assert "mmcafnet-lite" in captured.out and "counting" not in captured.out


def test_training_takes_the_one_thread_setting(monkeypatch) -> None:
    from MMCAFNetLib.train.loop import training_threads

    monkeypatch.delenv("MMCAFNET_THREADS", raising=False)
    assert training_threads(0) == 0  # torch's default
    monkeypatch.setenv("MMCAFNET_THREADS", "1")
    assert training_threads(0) == 1 and training_threads(3) == 3  # the config's num_threads wins
    monkeypatch.setenv("MMCAFNET_THREADS", "two")
    with pytest.raises(ValueError, match="MMCAFNET_THREADS must be a whole number"):
        training_threads(0)


def test_train_names_the_thread_setting(tmp_path, capsys, monkeypatch) -> None:
    """`train` says how many threads it uses and how to change them, before any work."""
    monkeypatch.setenv("MMCAFNET_THREADS", "1")
    # A cohort that does not exist: train prints the thread line, then stops with a clear error.
    code = main(["train", "--cohort", str(tmp_path / "none.csv"), "--out", str(tmp_path / "run"), "--no-progress"])
    err = capsys.readouterr().err
    assert "CPU threads: 1" in err and "MMCAFNET_THREADS" in err
    assert code == 2
