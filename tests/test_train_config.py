"""Training options out of range and broken config files stop with a sentence, before anything
is read or trained, from the command line and from Python alike."""

from __future__ import annotations

import logging

import pytest

from difflora.errors import DiffLoRAError
from difflora.train.__main__ import main
from difflora.train.config import DiTTrainConfig, IdentityLoraConfig, LAETrainConfig, read_config_file


@pytest.mark.parametrize("flag,value,rule", [
    ("--grad-accum", "0", "at least 1"), ("--steps", "0", "at least 1"), ("--batch-size", "0", "at least 1"),
    ("--batch-size", "-2", "at least 1"), ("--eval-every", "0", "at least 1"), ("--ckpt-every", "0", "at least 1"),
    ("--log-every", "0", "at least 1"), ("--lr", "-1", "above 0"), ("--lr", "nan", "finite"),
    ("--val-fraction", "1", "below 1"), ("--ema-decay", "2", "at most 1"),
])
def test_cli_refuses_out_of_range_options(tmp_path, caplog, flag, value, rule):
    run = tmp_path / "run"
    with caplog.at_level(logging.ERROR, logger="difflora.train"):
        rc = main(["lae", "--loras", str(tmp_path / "missing"), "--run", str(run), flag, value, "--no-progress"])
    assert rc == 1 and not run.exists()  # refused before anything is read or written
    assert f"({flag}) is " in caplog.text and rule in caplog.text


def test_python_api_runs_the_same_checks():
    with pytest.raises(DiffLoRAError, match=r"grad_accum \(--grad-accum\) is 0 but must be at least 1"):
        LAETrainConfig(grad_accum=0)
    with pytest.raises(DiffLoRAError, match=r"p_uncond .* must be .*below 1"):
        DiTTrainConfig(p_uncond=1.5)
    with pytest.raises(DiffLoRAError, match=r"lr \(--lr\) is nan: give it a finite number"):
        IdentityLoraConfig(lr=float("nan"))
    LAETrainConfig(), DiTTrainConfig(), IdentityLoraConfig()  # the defaults are valid


@pytest.mark.parametrize("name,data,message", [
    ("bad.json", b'{"lr": 1e-3,}', "is not valid JSON"),
    ("bad.yaml", b"lr: [1\n  x: :", "is not valid YAML"),
    ("deep.json", b"[" * 100000 + b"]" * 100000, "is not valid JSON"),
    ("latin1.json", '{"run": "caf\u00e9"}'.encode("latin-1"), "is not UTF-8 text"),
    ("list.json", b"[1, 2]", "must hold a mapping"),
])
def test_broken_config_files_give_a_sentence(tmp_path, name, data, message):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DiffLoRAError, match=message):
        read_config_file(str(tmp_path / name))


def test_utf16_and_bom_config_files_are_read(tmp_path):
    (tmp_path / "notepad.json").write_bytes('{"lr": 0.001, "batch-size": 4}'.encode("utf-16"))
    (tmp_path / "bom.yaml").write_bytes("lr: 0.002\n".encode("utf-8-sig"))
    assert read_config_file(str(tmp_path / "notepad.json")) == {"lr": 0.001, "batch_size": 4}
    assert read_config_file(str(tmp_path / "bom.yaml")) == {"lr": 0.002}


def test_config_file_values_are_typed_and_checked_with_a_sentence():
    """config_from_values (config files, the command line): unknown names, wrong types, choices and
    bounds each end in a sentence naming whose option it is."""
    from difflora.validation import config_from_values

    cfg = config_from_values(LAETrainConfig, {"lr": "0.001", "steps": 7.0}, "lae")
    assert (cfg.lr, cfg.steps) == (0.001, 7) and isinstance(cfg.steps, int)
    with pytest.raises(DiffLoRAError, match=r"Unknown lae option\(s\) \['learning_rate'\]: valid ones are"):
        config_from_values(LAETrainConfig, {"learning_rate": 1e-3}, "lae")
    with pytest.raises(DiffLoRAError, match=r"lae option steps='many' is not a int"):
        config_from_values(LAETrainConfig, {"steps": "many"}, "lae")
    with pytest.raises(DiffLoRAError, match=r"lae option resume='yes' must be true or false"):
        config_from_values(LAETrainConfig, {"resume": "yes"}, "lae")
    with pytest.raises(DiffLoRAError, match=r"lae option norm_per='block' is not one of \['layer', 'position'\]"):
        config_from_values(LAETrainConfig, {"norm_per": "block"}, "lae")
    with pytest.raises(DiffLoRAError, match=r"^dit stage option p_uncond \(--p-uncond\) is 1.0 but must be below 1"):
        config_from_values(DiTTrainConfig, {"p_uncond": 1}, "dit stage")
