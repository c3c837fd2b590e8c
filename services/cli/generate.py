"""``maas generate NAME PROMPT``: run a generative model and print its answer as it is produced.

Tokens go to stdout as they arrive (flushed each time), then a newline; the finish reason goes
to stderr, so ``maas generate m "..." > answer.txt`` keeps only the text. Errors end the command
as the other commands' do (``error CODE: message`` on stderr, status 1); Ctrl-C cancels the call,
which stops the generation on the worker.
"""

from __future__ import annotations

import json
from typing import Annotated, cast

import typer
from rich.console import Console

from services.cli.tune import ClientFactory
from services.client import GenerationOptions, MaasClient, TextPiece

_STOPPED_EXIT_CODE = 130
"""Exit status after Ctrl-C (128 + SIGINT), as shells report it."""


def _options(
    max_new_tokens: int | None,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    do_sample: bool | None,
) -> GenerationOptions:
    given = {
        "max_new_tokens": max_new_tokens, "temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
        "do_sample": do_sample,
    }  # fmt: skip
    return cast(GenerationOptions, {name: value for name, value in given.items() if value is not None})


def _stream(
    client: MaasClient,
    name: str,
    prompt: str,
    version: str,
    timeout_s: float,
    as_json: bool,
    options: GenerationOptions,
    err: Console,
) -> None:
    printed = False
    try:
        for piece in client.generate(name, prompt, version=version, timeout_s=timeout_s, **options):
            if as_json:
                line = {"text": piece.text, "final": piece.is_final}
                if piece.is_final:
                    line |= {"finish_reason": piece.finish_reason, "model_version": piece.model_version}
                typer.echo(json.dumps(line))
                continue
            typer.echo(piece.text, nl=False)  # click.echo flushes
            printed = True
            if piece.is_final:
                typer.echo("")
                err.print(f"finish_reason: {piece.finish_reason}", highlight=False)
    except BaseException:
        if printed:
            typer.echo("")  # end the partial line before the error
        raise


def _whole(answer: TextPiece, as_json: bool, err: Console) -> None:
    """Print a ``--no-stream`` answer: its text (the finish reason on stderr), or one JSON object."""
    if as_json:
        typer.echo(json.dumps({"text": answer.text, "finish_reason": answer.finish_reason,
                               "model_version": answer.model_version}))  # fmt: skip
        return
    typer.echo(answer.text)
    err.print(f"finish_reason: {answer.finish_reason}", highlight=False)


def register(app: typer.Typer, client: ClientFactory, out: Console, err: Console) -> None:
    """Add ``maas generate`` to ``app``; ``client`` yields the CLI's configured client."""

    @app.command("generate")
    def generate(
        name: Annotated[str, typer.Argument(help="A deployed generative model.")],
        prompt: Annotated[str, typer.Argument(help="The text to continue.")],
        version: Annotated[str, typer.Option(help="Version or alias ('' = deployed).")] = "",
        max_new_tokens: Annotated[
            int | None, typer.Option(min=1, help="Tokens to generate at most (default 128, capped by the gateway).")
        ] = None,
        temperature: Annotated[float | None, typer.Option(help="Sampling temperature (> 0).")] = None,
        top_k: Annotated[int | None, typer.Option(min=0, help="Sample among the k likeliest tokens.")] = None,
        top_p: Annotated[float | None, typer.Option(help="Sample within this probability mass, in (0, 1].")] = None,
        seed: Annotated[int | None, typer.Option(help="Random seed: a seeded sampling is reproducible.")] = None,
        do_sample: Annotated[
            bool | None,
            typer.Option(
                "--sample/--greedy",
                help="Sample (temperature, top-k, top-p) or decode greedily (default: sample when one of them is set).",
                show_default=False,
            ),
        ] = None,
        no_stream: Annotated[
            bool, typer.Option("--no-stream", help="One ModelInfer call: print the whole text at the end.")
        ] = False,
        as_json: Annotated[
            bool,
            typer.Option(
                "--json",
                help="Print JSON: a line per piece ({text, final, ...}); --no-stream: {text, finish_reason, ...}.",
            ),
        ] = False,
        timeout_s: Annotated[float, typer.Option("--timeout", min=0.001, help="Deadline in seconds.")] = 60.0,
    ) -> None:
        """Run a generative model on PROMPT and print its answer token by token (the finish reason on stderr)."""
        options = _options(max_new_tokens, temperature, top_k, top_p, seed, do_sample)
        try:
            with client() as maas:
                if no_stream:
                    _whole(
                        maas.generate_answer(name, prompt, version=version, timeout_s=timeout_s, **options),
                        as_json,
                        err,
                    )
                    return
                _stream(maas, name, prompt, version, timeout_s, as_json, options, err)
        except KeyboardInterrupt:
            err.print("cancelled")
            raise typer.Exit(_STOPPED_EXIT_CODE) from None
