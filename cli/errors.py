"""The command line's error boundary: every error is one line (plus a hint), the traceback only with ``-v``.

fusion-cache's own errors (`fusion_cache.errors`) already name the setting and the value; remote errors (offline, a
missing fsspec backend, a repository or revision not found, no permission) become `RemoteError` or
`MissingDependencyError` at the storage layer (fusion_cache/cache/storage.py), so they arrive here as one line too.
Errors from elsewhere (the Hugging Face hub loading a model, torch, a bug) would otherwise arrive as tracebacks of
50-120 lines; here they become ``error: <first line>`` and a hint of what to check, and exit with status 2 (1 for a
bug).
"""

from __future__ import annotations

import traceback

import typer
from typer._click.exceptions import ClickException  # typer runs on its own copy of click

from fusion_cache.cli.logs import is_verbose
from fusion_cache.errors import FusionCacheError

# (words in the message, hint): the first that matches gives the hint of a foreign error.
_HINTS = (
    (
        ("not a valid model identifier", "Repository Not Found", "RepositoryNotFound", "repo id", "Repo id"),
        "check the model name: a preset (`fusion-cache teachers`), a local model directory, or an HF id org/name; "
        "private or gated models need `hf auth login`",
    ),
    (
        (
            "couldn't connect",
            "Connection",
            "ConnectError",
            "ConnectTimeout",
            "Name or service not known",
            "offline",
            "OfflineMode",
            "LocalEntryNotFound",
            "Max retries",
        ),
        "the Hugging Face hub is unreachable: use a local directory (`fusion-cache pull` a cache while online), or "
        "set HF_HUB_OFFLINE=1 to read the local cache only",
    ),
    (
        ("Protocol not known", "Install s3fs", "Install gcsfs", "Install adlfs", "fsspec"),
        "install the fsspec backend of that URL (s3fs for s3://, gcsfs for gs://, adlfs for az://; hf:// comes "
        "with huggingface_hub)",
    ),
    (("out of memory", "CUDA error: out of memory"), "lower --batch-size or --max-length, or add --grad-checkpointing"),
)


def hint_for(e: BaseException) -> str | None:
    text = f"{type(e).__name__}: {e}"
    for words, hint in _HINTS:
        if any(w in text for w in words):
            return hint
    if isinstance(e, ImportError):
        return "install the missing package (see the README's set-up)"
    return None


def report(e: Exception) -> int:
    """Print ``e`` for the user (see the module docstring) and return the exit status."""
    if is_verbose():
        traceback.print_exception(e)
    if isinstance(e, FusionCacheError):
        typer.secho(f"error: {e}", fg=typer.colors.RED, err=True)
        return 2
    lines = [line for line in str(e).splitlines() if line.strip()]
    first = lines[0].strip() if lines else ""
    foreign = isinstance(e, (OSError, ValueError, ImportError))  # the hub, files, fsspec, the trainer's checks
    typer.secho(f"error: {type(e).__name__}: {first}" if first else f"error: {type(e).__name__}", fg=typer.colors.RED,
                err=True)  # fmt: skip
    hint = hint_for(e)
    if hint:
        typer.secho(f"hint: {hint}", err=True)
    if not is_verbose():
        typer.secho(
            "(run with -v for the traceback)" if foreign or hint else
            "(this looks like a bug: run with -v for the traceback and report it)", err=True,
        )  # fmt: skip
    return 2 if (foreign or hint) else 1


class ErrorBoundary(typer.core.TyperGroup):
    """The app's group: its subcommands' errors go through `report` instead of a traceback."""

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except (ClickException, typer.Exit, typer.Abort, KeyboardInterrupt):  # usage errors, exits: typer's to show
            raise
        except Exception as e:  # noqa: BLE001 (the boundary: every error is reported, none is lost)
            raise typer.Exit(code=report(e)) from e
