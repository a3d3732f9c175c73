// The `hello` example plugin in JavaScript (componentize-js), the same plugin as
// plugins/hello (Rust) and plugins/python/hello (Python).
//
// Config: the greeting (default "hello").
//
// - `/hello` is answered by the plugin: `<greeting> from javascript`, with `x-hello-count`, a
//   count kept in the key-value store (shared by every instance), and counter `hello_served`.
// - `/hello/rank?model=M&user=U&items=1,2,3` asks the gateway's model M to rank the items and
//   answers with the scores as JSON (or the ranking error, with status 502).
// - `/hello/boom` throws: the call fails (500 on fail-closed routes) and the error, with its
//   message, is in the gateway's log next to the failure.
// - `/hello/fetch` tries an outgoing HTTP request: a plugin has no network, so the answer is
//   the error it got.
// - Any other request goes upstream with `x-hello: javascript`; every response gets
//   `x-hello-lang: javascript`.
//
// Build: `npx componentize-js --wit ../../../wit --world-name plugin -o hello.wasm hello.js`
// (or `plugins/build.sh`, which builds every plugin into plugins/dist/).

import { counterAdd, kvIncrement } from "storefront:gateway/host@0.1.0";
import { rank } from "storefront:gateway/ranking@0.1.0";

let greeting = "hello";
const encoder = new TextEncoder();

function respond(status, text, headers = []) {
  return {
    tag: "respond",
    val: {
      status,
      headers: [["content-type", "text/plain; charset=utf-8"], ...headers],
      body: encoder.encode(text),
    },
  };
}

function queryParams(req) {
  const params = {};
  for (const pair of (req.query() ?? "").split("&")) {
    const [key, value = ""] = pair.split("=");
    if (key) params[key] = value;
  }
  return params;
}

export function init(config) {
  greeting = config.trim() || "hello";
}

export async function onRequest(req) {
  const path = req.path();
  if (path === "/hello") {
    counterAdd("hello_served", 1n);
    const count = kvIncrement("hello_count", 1n, undefined);
    return respond(200, `${greeting} from javascript\n`, [["x-hello-count", String(count)]]);
  }
  if (path === "/hello/rank") {
    const params = queryParams(req);
    const items = (params.items ?? "").split(",").filter((i) => i).map(Number);
    let scores;
    try {
      scores = rank(params.model ?? "", Number(params.user ?? 0), items);
    } catch (e) {
      return respond(502, `ranking failed: ${e.payload ?? e}\n`);
    }
    const body = JSON.stringify({ version: scores.version, scores: Array.from(scores.values) });
    return respond(200, body + "\n");
  }
  if (path === "/hello/boom") {
    throw new Error("boom: the javascript plugin failed on purpose");
  }
  if (path === "/hello/fetch") {
    try {
      const r = await fetch("http://127.0.0.1/");
      return respond(200, `fetched: ${r.status}\n`);
    } catch (e) {
      return respond(200, `error: ${e}\n`);
    }
  }
  req.setHeader("x-hello", "javascript");
  return { tag: "continue" };
}

export function onResponse(resp) {
  resp.setHeader("x-hello-lang", "javascript");
}
