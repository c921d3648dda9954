"""Quiet logs: vLLM's and transformers' logs (and transformers' own progress bars) only with -v; a level the user
set in the environment wins."""

from __future__ import annotations

import logging
import os

import transformers.utils.logging as tf_logging

from fusion_cache.cli import logs


def test_the_libraries_are_quiet_unless_verbose(monkeypatch):
    monkeypatch.setattr(logs, "_USER_ENV", {"VLLM_LOGGING_LEVEL": None, "TRANSFORMERS_VERBOSITY": None})
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("TRANSFORMERS_VERBOSITY", raising=False)
    try:
        logs.configure_logging(verbose=False)
        assert os.environ["VLLM_LOGGING_LEVEL"] == "ERROR" and os.environ["TRANSFORMERS_VERBOSITY"] == "error"
        assert tf_logging.get_verbosity() == logging.ERROR
        assert logging.getLogger("fusion_cache").level == logging.WARNING and not logs.is_verbose()
        logs.configure_logging(verbose=True)
        assert os.environ["VLLM_LOGGING_LEVEL"] == "INFO" and tf_logging.get_verbosity() == logging.INFO
        assert logging.getLogger("fusion_cache").level == logging.INFO and logs.is_verbose()
    finally:
        logs.configure_logging(verbose=False)


def test_the_users_levels_win(monkeypatch):
    monkeypatch.setattr(logs, "_USER_ENV", {"VLLM_LOGGING_LEVEL": "DEBUG", "TRANSFORMERS_VERBOSITY": "debug"})
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")
    logs.configure_logging(verbose=False)
    assert os.environ["VLLM_LOGGING_LEVEL"] == "DEBUG"


def test_transformers_bars_are_hidden_unless_verbose():
    previous = tf_logging.set_tqdm_hook(None)
    try:
        logs.configure_logging(verbose=False)
        logs.quiet_library_progress()
        assert tf_logging.tqdm(range(3), desc="Loading weights").disable
        logs.configure_logging(verbose=True)
        assert not tf_logging.tqdm(range(3), desc="Loading weights").disable
    finally:
        logs.configure_logging(verbose=False)
        tf_logging.set_tqdm_hook(previous)
