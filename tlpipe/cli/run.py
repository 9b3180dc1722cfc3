"""A fit's record after the fit: ``tlpipe report`` (report.html rebuilt), ``tlpipe ui`` (the MLflow
UI on the run history) and ``tlpipe serve`` (a fit's MLflow model over HTTP)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from tlpipe.cli.common import UnixUsage, user_errors

app = typer.Typer()


@app.command(cls=UnixUsage)
def report(
    output: Annotated[Path, typer.Argument(help="The output folder of a finished tlpipe fit.")],
) -> None:
    """Rebuild <output>/report.html (one self-contained page: data, strategy, trials, metrics, mistakes)."""
    with user_errors():
        from tlpipe.run.html_report import write_html_report

        typer.echo(str(write_html_report(output)))


@app.command(cls=UnixUsage)
def ui(
    ctx: typer.Context,
    output: Annotated[Optional[Path], typer.Argument(help="A fit's output folder: the UI opens on the store it logged to.")] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port for the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it private to this machine.")] = "127.0.0.1",
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: the fit's, else the one tlpipe fit uses).")] = None,
) -> None:
    """Serve the MLflow UI on the run history (model-training view, the runs with their scores),
    bound to 127.0.0.1 unless told otherwise. MLflow's own log lines go to a file unless -v."""
    with user_errors():
        from tlpipe.run.servers import address, check_port_free, exposure_warning, runs_page, serve_ui, ui_store

        tracking_uri, runs = ui_store(output, tracking_uri)
        check_port_free(host, port)
        if warning := exposure_warning(host, "the MLflow UI", "read, change and delete every run in the store"):
            typer.echo(warning, err=True)
        if not runs:
            typer.echo(f"warning: the store {tracking_uri} holds no runs yet: fit first, or point at the store a fit "
                       "logged to (tlpipe ui FIT_OUTPUT, or --tracking-uri)", err=True)
        bound = address(host, port)
        also = f"; also at {bound}" if address(host, port, page=True) != bound else ""  # a browser may resolve no *.localhost
        typer.echo(f"MLflow UI on {runs_page(tracking_uri, host, port)} for {tracking_uri} (Ctrl+C stops it{also})")
        raise typer.Exit(serve_ui(tracking_uri, host, port, quiet=not (ctx.obj or {}).get("verbose")))


@app.command(cls=UnixUsage)
def serve(
    target: Annotated[str, typer.Argument(help="A fit's output folder, or an MLflow model URI (runs:/<id>/model, models:/NAME@champion).")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port for the REST endpoint.")] = 5001,
    host: Annotated[str, typer.Option(help="Interface to bind; 127.0.0.1 keeps it private to this machine.")] = "127.0.0.1",
    tracking_uri: Annotated[Optional[str], typer.Option(help="MLflow store (default: the fit's, else the one tlpipe fit uses).")] = None,
    max_rows: Annotated[Optional[int], typer.Option(min=1, help="Most images in one request; more is answered 400 (default: TLPIPE_SERVE_MAX_ROWS, else 256).")] = None,
    no_reject: Annotated[bool, typer.Option("--no-reject", help="Never flag an image unknown, whatever a request asks; its unknown score stays.")] = False,
) -> None:
    """Serve a fit's MLflow model over HTTP (mlflow models serve: POST /invocations with base64 images),
    once the model and the tlpipe code stored with it (which the server runs) are checked."""
    with user_errors():
        from tlpipe.bundle.serving import MAX_ROWS_ENV, REJECT_ENV, check_served_model, row_cap, serve_command, served_model
        from tlpipe.run.servers import check_port_free, exposure_warning, run_server

        served = served_model(target, tracking_uri)
        check_served_model(served, reject=not no_reject)
        check_port_free(host, port)
        if warning := exposure_warning(host, "mlflow models serve", "query the model"):
            typer.echo(warning, err=True)
        typer.echo(f"Serving {served.uri} ({served.store}) on http://{host}:{port}/invocations (Ctrl+C stops it)")
        env = {"MLFLOW_TRACKING_URI": served.store, MAX_ROWS_ENV: str(max_rows or row_cap()), REJECT_ENV: str(not no_reject).lower()}
        raise typer.Exit(run_server(serve_command(served.uri, host, port), "mlflow models serve", env))


