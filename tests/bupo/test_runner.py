"""The driver keeps earlier JSONL log segments of a resumed run (verl's file logger truncates)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from verl_ext.bupo.runner import keep_resumed_file_logs


def test_fresh_log_path_per_start(monkeypatch, tmp_path):
    cfg = OmegaConf.create({"trainer": {"project_name": "bupo", "experiment_name": "exp"}})
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path))
    # set, then deleted, through monkeypatch: it then restores the variable's original absence even
    # though keep_resumed_file_logs writes os.environ directly (the path must not leak into later tests)
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", "")
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH")
    keep_resumed_file_logs(cfg)

    first = os.environ["VERL_FILE_LOGGER_PATH"]
    assert first == str(tmp_path / "bupo" / "exp.jsonl")
    (tmp_path / "bupo" / "exp.jsonl").write_text('{"step": 1, "data": {}}\n')
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH")
    keep_resumed_file_logs(cfg)
    assert os.environ["VERL_FILE_LOGGER_PATH"] == str(tmp_path / "bupo" / "exp.1.jsonl")
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", "/somewhere/mine.jsonl")
    keep_resumed_file_logs(cfg)  # a path the user set wins
    assert os.environ["VERL_FILE_LOGGER_PATH"] == "/somewhere/mine.jsonl"
