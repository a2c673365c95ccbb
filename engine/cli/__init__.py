"""The ``rainsweep`` command line. Each command lives in its own module and is imported only when used, so
``rainsweep --help`` and light commands start fast (torch, DALI and zarr load only where needed)."""
from __future__ import annotations

import importlib

import click

#: command name -> "module:attribute" of its click command.
COMMANDS = {
    "preview": "engine.cli.preview:preview",
    "bench": "engine.cli.bench:bench",
    "precompute": "engine.cli.store:precompute",
    "precompute-pairs": "engine.cli.pairs:precompute_pairs",
    "evaluate": "engine.cli.evaluate:evaluate",
    "info": "engine.cli.store:info",
    "select": "engine.cli.store:select",
    "sweep": "engine.cli.train:sweep",
    "demo": "engine.cli.train:demo",
    "toy": "engine.cli.toy:toy",
    "reproduce": "engine.cli.reproduce:reproduce",
    "prior": "engine.cli.prior:prior",
}


class LazyGroup(click.Group):
    """A click group that imports a command's module on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attr)


@click.group(cls=LazyGroup)
@click.version_option(package_name="rainsweep")
def main() -> None:
    """rainsweep: rain synthesis, patch stores and training sweeps for deraining generalization research."""


if __name__ == "__main__":
    main()
