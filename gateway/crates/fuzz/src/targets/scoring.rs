//! The scoring endpoint: a request → [`gateway_proxy::scoring_endpoint::handle`], the
//! function the proxy calls for paths under `[scoring] endpoint_prefix`, with two small sample
//! models served on the CPU path (`recs`, embedding; `ctr`, MLP) behind their real batchers.
//! The body's JSON parsing, the size limit, the checks of ids, vectors, `k` and rows, the
//! batching and the scoring all run.
//!
//! Input: a first line `METHOD REST [*N]` (`REST` is the path after the prefix, such as
//! `recs/rank`; `*N` repeats the body N times, so a short input can reach the 1 MiB limit),
//! then the body. An input without a newline is the body of `POST recs/rank`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use gateway_scoring::serving::{ModelFamilies, ModelSlot};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;

use crate::fixtures;
use crate::mutate::{Mutator, Rng};

/// Largest body after repetition: past the endpoint's 1 MiB limit, not much further.
const MAX_REPEATED_BODY: usize = (1 << 20) + 4096;

/// How long one request may take before the target calls it a hang.
const HANG: Duration = Duration::from_secs(20);

fn models() -> &'static HashMap<String, Arc<ModelSlot>> {
    static MODELS: OnceLock<HashMap<String, Arc<ModelSlot>>> = OnceLock::new();
    MODELS.get_or_init(|| {
        let registry = prometheus::Registry::new();
        let families = ModelFamilies::new(&registry).expect("model series register");
        fixtures::model_slots(&families)
    })
}

/// A request as the target's input describes it.
#[derive(Debug)]
pub struct Parsed {
    /// The method (an unknown token is kept as an extension method).
    pub method: Method,
    /// The path after the endpoint prefix.
    pub rest: String,
    /// The body, repeated as asked.
    pub body: Vec<u8>,
}

/// Splits an input into method, path and body (see the module docs).
pub fn parse(data: &[u8]) -> Parsed {
    let (head, body) = match data.iter().position(|&b| b == b'\n') {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => {
            return Parsed {
                method: Method::POST,
                rest: "recs/rank".into(),
                body: data.to_vec(),
            }
        }
    };
    let head = String::from_utf8_lossy(head);
    let mut words = head.split(' ');
    let method = Method::from_bytes(words.next().unwrap_or("").as_bytes()).unwrap_or(Method::POST);
    let rest = words.next().unwrap_or("").to_string();
    let times = words
        .next()
        .and_then(|w| w.strip_prefix('*'))
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(1)
        .max(1);
    let times = times.min(MAX_REPEATED_BODY / body.len().max(1)).max(1);
    Parsed {
        method,
        rest,
        body: body.repeat(times),
    }
}

/// Answers by status class (index 1 to 5) since the process started: how deep the inputs
/// get (a harness whose inputs all end in 400 fuzzes nothing behind the first check).
static ANSWERS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];

/// Counts of the scoring endpoint's answers by status class: `[_, 1xx, 2xx, 3xx, 4xx, 5xx]`.
pub fn answers() -> [u64; 6] {
    std::array::from_fn(|i| ANSWERS[i].load(Ordering::Relaxed))
}

/// The target (see the module docs).
pub fn run(data: &[u8]) {
    let parsed = parse(data);
    let models = models();
    let rest = parsed.rest.clone();
    let req = match Request::builder()
        .method(parsed.method)
        .uri("/_gateway/models")
        .body(gateway_proxy::upstream::full_body(Bytes::from(parsed.body)))
    {
        Ok(r) => r,
        Err(_) => return,
    };
    let (status, body) = fixtures::runtime().block_on(async move {
        let answer = tokio::time::timeout(
            HANG,
            gateway_proxy::scoring_endpoint::handle(models, &rest, req),
        )
        .await
        .unwrap_or_else(|_| panic!("the scoring endpoint did not answer in {HANG:?}"));
        let status = answer.status();
        let body = answer
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (status, body)
    });
    ANSWERS[usize::from(status.as_u16() / 100).min(5)].fetch_add(1, Ordering::Relaxed);
    // A model failing on a request it accepted, or a batcher gone, is a defect: the
    // request's own faults are 4xx, overload a 503 with retry-after.
    let text = String::from_utf8_lossy(&body);
    assert!(
        status != StatusCode::INTERNAL_SERVER_ERROR,
        "500 from the scoring endpoint: {text}"
    );
    assert!(
        !text.contains("is not serving"),
        "a model's batcher is gone (it panicked?): {text}"
    );
    if status == StatusCode::OK {
        let v: serde_json::Value = serde_json::from_slice(&body).expect("a 200 answer is JSON");
        assert!(v.is_object(), "a 200 answer is a JSON object: {text}");
    }
}

/// Numbers at the edges of the endpoint's checks (ids, `k`, vector values).
const EDGES: &[&str] = &[
    "0",
    "1",
    "7",
    "8",
    "9",
    "31",
    "32",
    "63",
    "64",
    "65",
    "127",
    "128",
    "129",
    "511",
    "512",
    "513",
    "4095",
    "4096",
    "65536",
    "4294967295",
    "4294967296",
    "-1",
    "0.5",
    "-0.0",
    "1e38",
    "3.5e38",
    "1e39",
    "-1e39",
    "1e-45",
    "18446744073709551615",
    "null",
];

fn edge(rng: &mut Rng) -> &'static str {
    EDGES[rng.below(EDGES.len())]
}

/// A number: usually a plausible id or value below `typical`, one in `edges` an edge.
fn number(rng: &mut Rng, typical: usize, edges: usize) -> String {
    if rng.one_in(edges) {
        edge(rng).to_string()
    } else {
        rng.below(typical).to_string()
    }
}

/// A JSON list of `len` numbers (an edge length at times).
fn list(rng: &mut Rng, len: usize, typical: usize) -> String {
    let n = match rng.below(20) {
        0 => rng.below(4096),
        1 | 2 => rng.below(len + 2),
        _ => len,
    };
    let items: Vec<String> = (0..n).map(|_| number(rng, typical, 256)).collect();
    format!("[{}]", items.join(","))
}

/// A well-formed request, usually with the fields its operation takes (the sample models:
/// `recs` 64 items × dim 8 with 16 users, `ctr` 32 users × 64 items with 4 dense features)
/// and values near and at the edges of the checks: what byte mutations of JSON rarely
/// produce, so the checks behind the parser (ids, dimensions, `k`, rows, batch limits) and
/// the scoring run often.
pub fn generate(rng: &mut Rng) -> Vec<u8> {
    let op = ["rank", "topk", "predict", "rank", "topk", "predict", "x"][rng.below(7)];
    let model = match (op, rng.one_in(5)) {
        (_, true) => ["recs", "ctr", "nope"][rng.below(3)],
        ("predict", false) => "ctr",
        _ => "recs",
    };
    let query = |rng: &mut Rng| {
        if rng.one_in(2) {
            format!("\"user\": {}", number(rng, 17, 8))
        } else {
            format!("\"vector\": {}", list(rng, 8, 3))
        }
    };
    let mut fields = match op {
        "rank" => {
            let n = 1 + rng.below(64);
            vec![query(rng), format!("\"candidates\": {}", list(rng, n, 65))]
        }
        "topk" => vec![query(rng), format!("\"k\": {}", number(rng, 80, 6))],
        _ => {
            let n = match rng.below(16) {
                0 => rng.below(3000),
                1 => 0,
                _ => 1 + rng.below(4),
            };
            let rows: Vec<String> = (0..n)
                .map(|_| {
                    let dense = if rng.one_in(8) {
                        String::new()
                    } else {
                        format!(", \"dense\": {}", list(rng, 4, 2))
                    };
                    format!(
                        "{{\"user\": {}, \"item\": {}{dense}}}",
                        number(rng, 33, 32),
                        number(rng, 65, 32)
                    )
                })
                .collect();
            vec![format!("\"rows\": [{}]", rows.join(", "))]
        }
    };
    if rng.one_in(5) {
        let extra = match rng.below(4) {
            0 => query(rng),
            1 => format!("\"k\": {}", number(rng, 10, 4)),
            2 => format!("\"candidates\": {}", list(rng, 2, 65)),
            _ => "\"rows\": []".to_string(),
        };
        fields.insert(rng.below(fields.len() + 1), extra);
    }
    if rng.one_in(10) && !fields.is_empty() {
        fields.remove(rng.below(fields.len()));
    }
    format!("POST {model}/{op}\n{{{}}}", fields.join(", ")).into_bytes()
}

/// The target's mutation: half the time a [`generate`]d request, else bytes mutated.
pub fn mutate(m: &Mutator, rng: &mut Rng, base: &[u8], other: &[u8]) -> Vec<u8> {
    if rng.one_in(2) {
        let mut out = generate(rng);
        out.truncate(m.max_len);
        out
    } else {
        m.mutate(rng, base, other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_requests_are_json() {
        let mut rng = Rng::new(3);
        for _ in 0..200 {
            let input = generate(&mut rng);
            let p = parse(&input);
            let body: serde_json::Value = serde_json::from_slice(&p.body)
                .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&input)));
            assert!(body.is_object());
        }
    }

    #[test]
    fn inputs_name_method_path_and_repetition() {
        let p = parse(b"PUT ctr/predict *3\nab");
        assert_eq!(p.method, Method::PUT);
        assert_eq!(p.rest, "ctr/predict");
        assert_eq!(p.body, b"ababab");
        let p = parse(b"{\"user\": 1}");
        assert_eq!((p.method, p.rest.as_str()), (Method::POST, "recs/rank"));
        let p = parse(b"POST recs/rank *99999999999\nx");
        assert_eq!(p.body.len(), MAX_REPEATED_BODY);
    }
}
