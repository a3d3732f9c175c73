//! `hello`: the example plugin, the same in Rust (this crate), Python
//! (`plugins/python/hello/app.py`) and JavaScript (`plugins/js/hello/hello.js`).
//!
//! Config: the greeting (default "hello").
//!
//! - `/hello` is answered by the plugin: `<greeting> from rust`, with `x-hello-count`, a count
//!   kept in the key-value store (shared by every instance), and counter `hello_served`.
//! - `/hello/rank?model=M&user=U&items=1,2,3` asks the gateway's model M to rank the items and
//!   answers with the scores as JSON (or the ranking error, with status 502).
//! - `/hello/boom` panics: the call fails (500 on fail-closed routes) and the message is in the
//!   gateway's log.
//! - `/hello/file` and `/hello/socket` try to read a file and to open a TCP connection: a
//!   plugin has neither, so the answer is the error it got.
//! - Any other request goes upstream with `x-hello: rust`; every response gets
//!   `x-hello-lang: rust`.

use gateway_plugin_sdk::{kv, metrics, prelude::*, ranking};

/// The plugin: its greeting.
pub struct Hello {
    greeting: String,
}

fn text(status: u16, body: String) -> Action {
    LocalResponse::new(status)
        .header("content-type", "text/plain; charset=utf-8")
        .text(body)
        .into()
}

fn param<'a>(query: &'a str, key: &str) -> &'a str {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v)
}

impl Plugin for Hello {
    fn init(config: &str) -> Result<Self, String> {
        let greeting = config.trim();
        Ok(Hello {
            greeting: if greeting.is_empty() {
                "hello"
            } else {
                greeting
            }
            .to_string(),
        })
    }

    fn on_request(&mut self, req: &Request) -> Action {
        match req.path().as_str() {
            "/hello" => {
                metrics::counter_inc("hello_served");
                let count = kv::increment("hello_count", 1, None).unwrap_or(0);
                LocalResponse::new(200)
                    .header("content-type", "text/plain; charset=utf-8")
                    .header("x-hello-count", count.to_string())
                    .text(format!("{} from rust\n", self.greeting))
                    .into()
            }
            "/hello/rank" => {
                let query = req.query().unwrap_or_default();
                let items: Vec<u32> = param(&query, "items")
                    .split(',')
                    .filter_map(|i| i.parse().ok())
                    .collect();
                let user = param(&query, "user").parse().unwrap_or(0);
                match ranking::rank(param(&query, "model"), user, &items) {
                    Ok((version, scores)) => text(
                        200,
                        format!("{{\"version\":\"{version}\",\"scores\":{scores:?}}}\n"),
                    ),
                    Err(e) => text(502, format!("ranking failed: {e}\n")),
                }
            }
            "/hello/boom" => panic!("boom: the rust plugin failed on purpose"),
            "/hello/file" => match std::fs::read_to_string("/etc/passwd") {
                Ok(s) => text(200, format!("read: {}\n", &s[..s.len().min(64)])),
                Err(e) => text(200, format!("error: {e}\n")),
            },
            "/hello/socket" => match std::net::TcpStream::connect("127.0.0.1:80") {
                Ok(_) => text(200, "connected\n".into()),
                Err(e) => text(200, format!("error: {e}\n")),
            },
            _ => {
                let _ = req.set_header("x-hello", "rust");
                Action::Continue
            }
        }
    }

    fn on_response(&mut self, resp: &Response) {
        let _ = resp.set_header("x-hello-lang", "rust");
    }
}

export_plugin!(Hello);
