"""``python -m examples.demo_service [--host H] [--port P] [--address HOST:PORT]``."""

from __future__ import annotations

import argparse

import uvicorn

from examples.demo_service.app import create_app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo_service", description="The demo users service."
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    parser.add_argument("--port", type=int, default=9001, help="port to listen on")
    parser.add_argument(
        "--address",
        help="host:port the gateway reaches this instance at, published in /_farp/manifest "
        "(default: 127.0.0.1:PORT when listening on all interfaces, else HOST:PORT)",
    )
    args = parser.parse_args(argv)
    host = "127.0.0.1" if args.host in ("0.0.0.0", "::", "") else args.host
    address = args.address or f"{host}:{args.port}"
    uvicorn.run(create_app(address), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
