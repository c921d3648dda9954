"""How loud the command line is: fusion-cache's own WARNINGs by default, INFO with ``-v``; vLLM's and transformers'
logs and transformers' own progress bars ("Loading weights", "Writing model shards") only with ``-v``.

vLLM reads ``VLLM_LOGGING_LEVEL`` when it is imported and transformers reads ``TRANSFORMERS_VERBOSITY`` when its
logging starts, so the levels go into the environment before either is imported; a value the user set wins. A vLLM
start on CPU otherwise prints about 42 INFO/WARNING lines (the same ``set_num_threads`` warning four times).
"""

from __future__ import annotations

import logging
import os
import sys

# What the user's environment said before the CLI touched it (None: not set, the CLI chooses).
_USER_ENV = {name: os.environ.get(name) for name in ("VLLM_LOGGING_LEVEL", "TRANSFORMERS_VERBOSITY")}
_state = {"verbose": False}


def configure_logging(*, verbose: bool) -> None:
    """Set fusion-cache's level (INFO with ``verbose``, else WARNING) and vLLM's and transformers' (INFO with
    ``verbose``, else ERROR), including in libraries already imported."""
    _state["verbose"] = verbose
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("fusion_cache").setLevel(level)
    if _USER_ENV["VLLM_LOGGING_LEVEL"] is None:
        os.environ["VLLM_LOGGING_LEVEL"] = "INFO" if verbose else "ERROR"
        if "vllm" in sys.modules:  # vLLM configured its logger at import: set it directly
            logging.getLogger("vllm").setLevel(logging.INFO if verbose else logging.ERROR)
    if _USER_ENV["TRANSFORMERS_VERBOSITY"] is None:
        os.environ["TRANSFORMERS_VERBOSITY"] = "info" if verbose else "error"
        if "transformers.utils.logging" in sys.modules:
            sys.modules["transformers.utils.logging"].set_verbosity(logging.INFO if verbose else logging.ERROR)


def is_verbose() -> bool:
    return _state["verbose"]


def quiet_library_progress() -> None:
    """Hide transformers' own progress bars (loading and writing weights) unless ``-v``; downloads keep theirs.

    Imports transformers' logging module (about 0.9 s), so only commands that load models call it.
    """
    import transformers.utils.logging as tf_logging

    set_hook = getattr(tf_logging, "set_tqdm_hook", None)
    if set_hook is None:  # an older transformers: its bars stay
        return

    def hook(factory, args, kwargs):
        return factory(*args, **{**kwargs, "disable": kwargs.get("disable") or not _state["verbose"]})

    set_hook(hook)
