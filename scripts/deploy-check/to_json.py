"""Prints YAML documents (a JSON array) or a TOML document (a JSON object) as JSON, for
tests/deployment_files_validate.rs, which has no YAML or TOML reader of its own.

    to_json.py yaml FILE     every document of FILE, in order (empty ones left out)
    to_json.py toml FILE     the document; FILE "-" reads standard input
"""

import json
import sys
import tomllib

import yaml


def main() -> None:
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "yaml":
        with open(path, encoding="utf-8") as f:
            # The safe loader: plain data only. Anything else is a mistake in a manifest.
            value = [d for d in yaml.safe_load_all(f) if d is not None]
    elif kind == "toml":
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
        value = tomllib.loads(text)
    else:
        sys.exit(f"to_json.py: unknown kind {kind!r} (yaml or toml)")
    json.dump(value, sys.stdout)


if __name__ == "__main__":
    main()
