"""Starting the service: the token, the loopback rule for --no-auth, uvicorn."""

from __future__ import annotations

import sys
from pathlib import Path

from graphflow.service.config import ServiceConfig
from graphflow.service.security import is_loopback, load_or_create_token


class ServeError(Exception):
    """A configuration `graphflow serve` refuses (exit status 2)."""


def serve(config: ServiceConfig, *, host: str, port: int, no_auth: bool, cors_origins: tuple[str, ...]) -> None:
    """Run the service until interrupted."""
    try:
        import uvicorn

        from graphflow.service.app import create_app
    except ImportError as error:
        raise ServeError(f'graphflow serve needs the serve extra: pip install "graphflow[serve]" ({error})') from None
    if no_auth and not is_loopback(host):
        raise ServeError(f"--no-auth is refused on {host}: without a token anyone who reaches the port runs jobs; "
                         "serve on 127.0.0.1 or keep the token")
    if not config.graphs.is_dir():
        raise ServeError(f"--graphs {config.graphs} is not a folder of graph documents")
    config.prepare()
    token = None
    if not no_auth:
        token, created = load_or_create_token(config.data)
        where = Path(config.data) / "token"
        if created:
            print(f"graphflow serve: API token (kept in {where}, mode 0600): {token}", flush=True)
        else:
            print(f"graphflow serve: the API token is in {where}", flush=True)
    app = create_app(config, token=token, cors_origins=cors_origins)
    devices = config.worker_devices()
    print(f"graphflow serve: http://{host}:{port}/api (OpenAPI at /openapi.json); {len(devices)} worker"
          f"{'s' if len(devices) != 1 else ''} ({', '.join(devices)}); data in {config.data}", file=sys.stderr,
          flush=True)
    # open event streams would hold a graceful shutdown forever: they get a few seconds, then are closed
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=3)
