"""``python -m fusion_cache <command> ...``: the `fusion-cache` command line, also the torchrun entry point.

    torchrun --nproc-per-node 2 -m fusion_cache train --student ./student --shards ./cache/smollm2 --out ./runs/ddp

This is an entry point, not part of the library: no library module imports the CLI.
"""

from fusion_cache.cli.main import app

if __name__ == "__main__":
    app(prog_name="python -m fusion_cache")
