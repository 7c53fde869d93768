"""``mmcafnet models``: the parameters and GFLOPs table."""

from __future__ import annotations

import json

import torch

from MMCAFNetLib.cli import main
from MMCAFNetLib.models import create_model
from MMCAFNetLib.models.complexity import count_flops, count_parameters


def test_models_json_matches_the_models(capsys):
    assert main(["models", "--json", "--window", "8", "64", "64", "--model", "mmcafnet-lite", "--model", "tabular-kan"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert set(rows) == {"mmcafnet-lite", "tabular-kan"}
    with torch.device("meta"):
        lite = create_model("mmcafnet-lite")
    assert rows["mmcafnet-lite"]["parameters"] == count_parameters(lite)
    assert rows["mmcafnet-lite"]["window"] == [8, 64, 64]
    flops = count_flops(lite, (8, 64, 64))
    assert rows["mmcafnet-lite"]["flops"] == flops > 0
    assert abs(rows["mmcafnet-lite"]["gflops"] - flops / 1e9) < 1e-3
    assert rows["tabular-kan"]["parameters"] == 7 * 24 * 8 + 2 * 7 * 24 + 25


def test_models_table_lists_every_variant(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "12x192x192" in out
    for name in ("mmcafnet", "mmcafnet-lite", "image-only", "tabular-kan", "tabular-mlp", "late-fusion",
                 "concat-fusion", "cross-attention-single-scale"):
        assert any(line.split()[0] == name for line in out.splitlines()[1:]), name
    line = next(line for line in out.splitlines() if line.startswith("mmcafnet "))
    assert float(line.split()[1]) == round(count_parameters_meta("mmcafnet") / 1e6, 3)


def count_parameters_meta(name: str) -> int:
    with torch.device("meta"):
        return count_parameters(create_model(name))


def test_bad_options_exit_2(capsys):
    assert main(["models", "--model", "nope"]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["models", "--window", "4", "64", "64", "--model", "mmcafnet-lite"]) == 2
    assert "D >= 8" in capsys.readouterr().err
