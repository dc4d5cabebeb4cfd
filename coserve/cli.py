"""The `coserve` command line."""

from __future__ import annotations

import sys

import click
from pydantic import ValidationError

from coserve.clients.cli import COMMANDS as CLIENT_COMMANDS
from coserve.settings import ServeSettings


def _settings_options(func):
    """One --flag per ServeSettings field, documented from the field's description."""
    for name, field in reversed(list(ServeSettings.model_fields.items())):
        flag = "--" + name.replace("_", "-")
        help_text = f"{field.description} [env COSERVE_{name.upper()}; default {field.default}]"
        if field.annotation is bool:
            func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(func)
        elif field.annotation == list[str]:
            help_text = f"{field.description} [env COSERVE_{name.upper()} as a JSON list]"
            func = click.option(flag, name, multiple=True, help=help_text)(func)
        else:
            func = click.option(flag, name, default=None, help=help_text)(func)
    return func


@click.group()
@click.version_option(package_name="coserve")
def main() -> None:
    """coserve: one quantized base LLM, many tenants' adapters, co-served fine-tuning."""


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML file of settings (keys as the flags, with underscores)")
@_settings_options
def serve(config_file: str | None, **flags) -> None:
    """Run the OpenAI-compatible server."""
    try:
        settings = ServeSettings.load(config_file, **flags)
    except (ValidationError, FileNotFoundError) as exc:
        raise click.UsageError(str(exc)) from exc
    from coserve.server.serve import serve as run

    run(settings)


@main.command("demo-model")
@click.option("--size", type=click.Choice(["tiny", "small"]), default="small", show_default=True)
@click.option("--out", type=click.Path(file_okay=False), required=True, help="directory to write")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_model(size: str, out: str, seed: int) -> None:
    """Write a demo checkpoint (seeded random weights, trained BPE tokenizer, chat template)."""
    from coserve.engine.demo import write_demo_model

    path = write_demo_model(size, out, seed)
    click.echo(f"wrote {size} demo model to {path}")


for _command in CLIENT_COMMANDS:
    main.add_command(_command)


if __name__ == "__main__":
    sys.exit(main())
