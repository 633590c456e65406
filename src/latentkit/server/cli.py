"""``latentkit serve``: load the models once, then serve the API until interrupted.

Safe by default: loopback only; any other address needs ``--token``, refused in one
sentence before anything is loaded or bound.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import socket
from pathlib import Path

from latentkit.errors import ConfigError, LatentkitError
from latentkit.generation.flags import add_addon_folder_flags, addon_folders
from latentkit.runtime.device import resolve_device, resolve_dtype
from latentkit.server.jobs import JobQueue
from latentkit.weights import load
from latentkit.weights.shipped import DEFAULT_MODEL, SHIPPED

DEFAULT_PORT = 7860


def add_cli(commands) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an HTTP API (jobs, progress events, result PNGs) on a local port",
        description="Load the models once and serve the native API under /api/v1 "
        "(its documentation at /docs). Loopback only unless --token is given. Requests "
        "name LoRAs (<lora:NAME:W> in a prompt) found in --lora-dir or shipped.",
    )
    p.add_argument(
        "--model",
        dest="models",
        action="append",
        default=None,
        metavar="NAME_OR_PATH",
        help="a model to serve: a shipped name, a diffusers folder or a .safetensors file; "
        "repeatable, the first is the default; clients choose by name (a path's stem) "
        f"(default: {DEFAULT_MODEL})",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind; not loopback needs --token"
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="port to listen on")
    p.add_argument(
        "--token",
        default=None,
        help="require Authorization: Bearer TOKEN on every API call (default: none, loopback only)",
    )
    p.add_argument(
        "--outputs", type=Path, default=Path("outputs"), help="folder the result PNGs go to"
    )
    p.add_argument(
        "--queue-size", type=int, default=16, help="most jobs queued and running at once"
    )
    p.add_argument(
        "--batch-limit",
        type=int,
        default=4,
        help="most pictures of waiting jobs run in one U-Net batch (1: no batching)",
    )
    p.add_argument(
        "--job-timeout",
        type=float,
        default=600.0,
        help="seconds a job may run before it is ended as failed",
    )
    p.add_argument(
        "--cors",
        action="append",
        default=None,
        metavar="ORIGIN",
        help="a web origin (e.g. https://example.org) whose pages may call the API; "
        "repeatable (default: none, no cross-origin access)",
    )
    add_addon_folder_flags(p)
    p.set_defaults(run=run_serve)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or a name) binds to this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        found = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except OSError:
        return False
    return bool(found) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in found)


def check_serve_args(args: argparse.Namespace) -> None:
    """Everything about the flags that can be refused before loading or binding."""
    if not is_loopback(args.host) and not args.token:
        raise ConfigError(
            f"binding {args.host} exposes the server beyond this machine; give --token TOKEN "
            "(clients then send Authorization: Bearer TOKEN) or bind 127.0.0.1."
        )
    if args.token is not None and not args.token.strip():
        raise ConfigError("--token must not be empty.")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be from 0 to 65535, got {args.port}.")
    if args.queue_size < 1:
        raise ConfigError(f"--queue-size must be at least 1, got {args.queue_size}.")
    if args.batch_limit < 1:
        raise ConfigError(f"--batch-limit must be at least 1, got {args.batch_limit}.")
    if not args.job_timeout > 0:
        raise ConfigError(
            f"--job-timeout must be a positive number of seconds, got {args.job_timeout}."
        )
    for origin in args.cors or []:
        if origin == "*" or not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"--cors takes an origin such as https://example.org (scheme and host, no "
                f"path, not *), got {origin!r}."
            )
    addon_folders(args)  # --lora-dir and --embedding-dir are folders


def model_name(given: str) -> str:
    """What clients call a model: a shipped name as is, a path by its stem."""
    path = Path(given)
    return given if given in SHIPPED and not path.exists() else path.stem


def load_models(given: list[str]) -> dict:
    """name -> loaded components, in the order given (the first is the default)."""
    device = resolve_device("auto")
    dtype = resolve_dtype("auto", device)
    models = {}
    for model in given:
        name = model_name(model)
        if name in models:
            raise ConfigError(
                f"two models would both be called {name!r}; clients choose by name, so "
                "rename one folder or file."
            )
        models[name] = load(model, dtype=dtype, device=device)
    return models


def run_serve(args: argparse.Namespace) -> None:
    check_serve_args(args)
    try:
        import uvicorn  # optional extra: fastapi/uvicorn (pip install latentkit[serve])

        from latentkit.server.app import create_app  # optional extra: it imports fastapi
    except ImportError as err:
        raise LatentkitError(
            f"latentkit serve needs FastAPI and uvicorn ({err.name} is missing); "
            "install them with pip install 'latentkit[serve]'."
        ) from None
    queue = JobQueue(
        load_models(args.models or [DEFAULT_MODEL]),
        args.outputs,
        args.queue_size,
        batch_limit=args.batch_limit,
        timeout=args.job_timeout,
        folders=addon_folders(args),
    )
    queue.start()
    try:
        print(f"latentkit: serving {', '.join(queue.models)} on http://{args.host}:{args.port}")
        app = create_app(queue, token=args.token, cors=args.cors)
        uvicorn.run(app, host=args.host, port=args.port)
    finally:
        queue.close()
