"""Regenerate ``services/demo-users.json``, the demo service's manifest for the gateway's
default file discovery: ``python -m examples.demo_service.write_manifest``.

The OpenAPI document goes inline, so the gateway routes ``/demo-users/...`` even when the
demo service is not running (requests then answer 502). ``updated_at`` is kept when the
checksum has not changed, so regenerating an unchanged contract leaves the file as it is.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from examples.demo_service.app import DEFAULT_ADDRESS, build_manifest

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUTPUT = REPO / "services" / "demo-users.json"


def render(manifest: dict[str, Any]) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"


def write_manifest(output: Path = DEFAULT_OUTPUT, address: str = DEFAULT_ADDRESS) -> bool:
    """Write the manifest to ``output``; True when the file changed."""
    manifest = build_manifest(address)
    try:
        previous = json.loads(output.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        previous = None
    if isinstance(previous, dict) and previous.get("checksum") == manifest["checksum"]:
        manifest["updated_at"] = previous.get("updated_at", manifest["updated_at"])
    text = render(manifest)
    if output.exists() and output.read_text(encoding="utf-8") == text:
        return False
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(f".{output.name}.partial")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(output)
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples.demo_service.write_manifest", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--address", default=DEFAULT_ADDRESS, help="host:port of the instance")
    args = parser.parse_args(argv)
    changed = write_manifest(args.output, args.address)
    print(f"{args.output}: {'written' if changed else 'unchanged'}")


if __name__ == "__main__":
    main()
