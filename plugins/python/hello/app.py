"""The `hello` example plugin in Python (componentize-py), the same plugin as plugins/hello
(Rust) and plugins/js/hello (JavaScript).

Config: the greeting (default "hello").

- `/hello` is answered by the plugin: `<greeting> from python`, with `x-hello-count`, a count
  kept in the key-value store (shared by every instance), and counter `hello_served`.
- `/hello/rank?model=M&user=U&items=1,2,3` asks the gateway's model M to rank the items and
  answers with the scores as JSON (or the ranking error, with status 502).
- `/hello/boom` raises an exception: the call fails (500 on fail-closed routes) and the
  traceback, with its message, is in the gateway's log next to the failure.
- `/hello/file` and `/hello/socket` try to read a file and to open a TCP connection: a plugin
  has neither, so the answer is the error it got.
- Any other request goes upstream with `x-hello: python`; every response gets
  `x-hello-lang: python`.

Build: `componentize-py -d ../../../wit -w plugin componentize app -o hello.wasm`
(or `plugins/build.sh`, which builds every plugin into plugins/dist/).
"""

import json
import socket

import wit_world
from componentize_py_types import Err
from wit_world.imports import host, ranking
from wit_world.imports.http import (
    LocalResponse,
    Request,
    RequestAction,
    RequestAction_Continue,
    RequestAction_Respond,
    Response,
)

greeting = "hello"


def respond(status: int, text: str, headers=()) -> RequestAction:
    headers = [("content-type", "text/plain; charset=utf-8"), *headers]
    return RequestAction_Respond(LocalResponse(status, headers, text.encode()))


def query_params(req: Request) -> dict:
    params = {}
    for pair in (req.query() or "").split("&"):
        key, _, value = pair.partition("=")
        if key:
            params[key] = value
    return params


class WitWorld(wit_world.WitWorld):
    def init(self, config: str) -> None:
        global greeting
        greeting = config.strip() or "hello"

    def on_request(self, req: Request) -> RequestAction:
        path = req.path()
        if path == "/hello":
            host.counter_add("hello_served", 1)
            count = host.kv_increment("hello_count", 1, None)
            return respond(200, f"{greeting} from python\n", [("x-hello-count", str(count))])
        if path == "/hello/rank":
            params = query_params(req)
            items = [int(i) for i in params.get("items", "").split(",") if i]
            try:
                scores = ranking.rank(params.get("model", ""), int(params.get("user", "0")), items)
            except Err as e:
                return respond(502, f"ranking failed: {e.value}\n")
            body = json.dumps({"version": scores.version, "scores": list(scores.values)})
            return respond(200, body + "\n")
        if path == "/hello/boom":
            raise RuntimeError("boom: the python plugin failed on purpose")
        if path == "/hello/file":
            try:
                with open("/etc/passwd") as f:
                    return respond(200, "read: " + f.read(64) + "\n")
            except Exception as e:
                return respond(200, f"error: {type(e).__name__}: {e}\n")
        if path == "/hello/socket":
            try:
                s = socket.create_connection(("127.0.0.1", 80), timeout=1)
                s.close()
                return respond(200, "connected\n")
            except Exception as e:
                return respond(200, f"error: {type(e).__name__}: {e}\n")
        req.set_header("x-hello", "python")
        return RequestAction_Continue()

    def on_response(self, resp: Response) -> None:
        resp.set_header("x-hello-lang", "python")
