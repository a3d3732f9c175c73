//! Every scoring request gets the answer computed for that very request, whatever it was
//! batched with: rank, top-k and predict, valid and invalid, on an embedding and an MLP model,
//! sent together on one h2 connection, each checked against the CPU path for that request
//! alone. An over-limit request is refused alone, and the others of its batch are served.

use std::sync::Arc;

use bytes::Bytes;
use gateway::scoring::{
    sample_model, ComputeDevice, CtrRow, Model, Query, RankRequest, SampleSpec, ScoringConfig,
};
use http::Request;
use http_body_util::Full;
use serde_json::{json, Value};

use crate::support::*;

const N_ITEMS: usize = 300;
const N_USERS: usize = 50;
const DIM: usize = 16;

fn post(path: &str, body: &Value) -> Request<Full<Bytes>> {
    Request::post(format!("https://localhost{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

/// What a request should get: 400, or these (item, score) pairs.
#[derive(Debug)]
enum Expect {
    Bad,
    /// Rank: exactly these candidates with these scores.
    Ranked(Vec<(u32, f32)>),
    /// Top-k: `k` items, each with its score for this query, none beaten by an item left out.
    Top {
        k: usize,
        all_scores: Vec<f32>,
    },
    /// Predict: one probability per row, in row order.
    Predicted(Vec<(u32, f32)>),
}

struct Case {
    path: String,
    body: Value,
    expect: Expect,
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-3 * (1.0 + b.abs())
}

/// The CPU oracle: the model loaded on the CPU device, asked about one request alone.
struct Oracle {
    recs: Model,
    ctr: Model,
}

impl Oracle {
    fn rank(&self, user: Option<u32>, vector: Option<&[f32]>, candidates: &[u32]) -> Expect {
        let query = match (user, vector) {
            (Some(u), _) => Query::User(u),
            (None, Some(v)) => Query::Vector(v),
            _ => unreachable!(),
        };
        match self.recs.rank_cpu(&[RankRequest { query, candidates }]) {
            Ok(mut s) => Expect::Ranked(candidates.iter().copied().zip(s.remove(0)).collect()),
            Err(_) => Expect::Bad,
        }
    }

    fn top(&self, user: u32, k: usize) -> Expect {
        let all: Vec<u32> = (0..N_ITEMS as u32).collect();
        let q = Query::User(user);
        match self.recs.top_k_cpu(&[q], k) {
            Err(_) => Expect::Bad,
            Ok(_) => match self.recs.rank_cpu(&[RankRequest {
                query: q,
                candidates: &all,
            }]) {
                Ok(mut s) => Expect::Top {
                    k: k.min(N_ITEMS),
                    all_scores: s.remove(0),
                },
                Err(_) => Expect::Bad,
            },
        }
    }

    fn predict(&self, rows: &[(u32, u32, Vec<f32>)]) -> Expect {
        let r: Vec<CtrRow<'_>> = rows
            .iter()
            .map(|(user, item, dense)| CtrRow {
                user: *user,
                item: *item,
                dense,
            })
            .collect();
        match self.ctr.predict_cpu(&r) {
            Ok(p) => Expect::Predicted(rows.iter().map(|r| r.1).zip(p).collect()),
            Err(_) => Expect::Bad,
        }
    }
}

/// A mix of every operation on both models, valid and invalid, reproducible from `seed`.
fn cases(oracle: &Oracle, seed: u64) -> Vec<Case> {
    let mut rng = gateway::scoring::sample::SplitMix64(seed);
    let mut out = Vec::new();
    for i in 0..120u32 {
        let user = rng.below(N_USERS as u64) as u32;
        let case = match i % 12 {
            // Valid rank by user id.
            0..=2 => {
                let n = 1 + rng.below(12) as usize;
                let cands: Vec<u32> = (0..n).map(|_| rng.below(N_ITEMS as u64) as u32).collect();
                Case {
                    path: "/_gateway/models/recs/rank".into(),
                    body: json!({"user": user, "candidates": cands}),
                    expect: oracle.rank(Some(user), None, &cands),
                }
            }
            // Valid rank by query vector.
            3 => {
                let v: Vec<f32> = (0..DIM).map(|_| rng.next_f32() - 0.5).collect();
                let cands: Vec<u32> = (0..5).map(|_| rng.below(N_ITEMS as u64) as u32).collect();
                Case {
                    path: "/_gateway/models/recs/rank".into(),
                    body: json!({"vector": v, "candidates": cands}),
                    expect: oracle.rank(None, Some(&v), &cands),
                }
            }
            // Valid top-k.
            4 | 5 => {
                let k = 1 + rng.below(20) as usize;
                Case {
                    path: "/_gateway/models/recs/topk".into(),
                    body: json!({"user": user, "k": k}),
                    expect: oracle.top(user, k),
                }
            }
            // Valid predict on the MLP model.
            6 | 7 => {
                let rows: Vec<(u32, u32, Vec<f32>)> = (0..1 + rng.below(4))
                    .map(|_| {
                        (
                            rng.below(N_USERS as u64) as u32,
                            rng.below(N_ITEMS as u64) as u32,
                            (0..4).map(|_| rng.next_f32()).collect(),
                        )
                    })
                    .collect();
                let body_rows: Vec<Value> = rows
                    .iter()
                    .map(|(u, it, d)| json!({"user": u, "item": it, "dense": d}))
                    .collect();
                Case {
                    path: "/_gateway/models/ctr/predict".into(),
                    body: json!({ "rows": body_rows }),
                    expect: oracle.predict(&rows),
                }
            }
            // The wrong operation for the model's kind.
            8 => match rng.below(3) {
                0 => Case {
                    path: "/_gateway/models/recs/predict".into(),
                    body: json!({"rows": [{"user": 1, "item": 2, "dense": [0.0, 0.0, 0.0, 0.0]}]}),
                    expect: Expect::Bad,
                },
                1 => Case {
                    path: "/_gateway/models/ctr/rank".into(),
                    body: json!({"user": 1, "candidates": [1, 2]}),
                    expect: Expect::Bad,
                },
                _ => Case {
                    path: "/_gateway/models/ctr/topk".into(),
                    body: json!({"user": 1, "k": 3}),
                    expect: Expect::Bad,
                },
            },
            // Unknown ids and wrong dimensions, found when the batch is prepared.
            9 => match rng.below(4) {
                0 => Case {
                    path: "/_gateway/models/recs/rank".into(),
                    body: json!({"user": 10_000, "candidates": [1]}),
                    expect: Expect::Bad,
                },
                1 => Case {
                    path: "/_gateway/models/recs/rank".into(),
                    body: json!({"user": user, "candidates": [1, 100_000]}),
                    expect: Expect::Bad,
                },
                2 => Case {
                    path: "/_gateway/models/recs/rank".into(),
                    body: json!({"vector": [1.0, 2.0], "candidates": [1]}),
                    expect: Expect::Bad,
                },
                _ => Case {
                    path: "/_gateway/models/ctr/predict".into(),
                    body: json!({"rows": [{"user": 1, "item": 2, "dense": [0.5]}]}),
                    expect: Expect::Bad,
                },
            },
            // Over the per-request limits (65,536 candidates, k 128 after clamping, 4,096 rows).
            10 => match rng.below(3) {
                0 => {
                    let cands: Vec<u32> = (0..70_000u32).map(|c| c % N_ITEMS as u32).collect();
                    Case {
                        path: "/_gateway/models/recs/rank".into(),
                        body: json!({"user": user, "candidates": cands}),
                        expect: Expect::Bad,
                    }
                }
                1 => Case {
                    path: "/_gateway/models/recs/topk".into(),
                    body: json!({"user": user, "k": 4_294_967_295u64}),
                    expect: Expect::Bad,
                },
                _ => {
                    let rows: Vec<Value> = (0..4_097)
                        .map(|r| json!({"user": 1, "item": r % N_ITEMS, "dense": [0.0, 0.0, 0.0, 0.0]}))
                        .collect();
                    Case {
                        path: "/_gateway/models/ctr/predict".into(),
                        body: json!({ "rows": rows }),
                        expect: Expect::Bad,
                    }
                }
            },
            // A large but allowed rank: goes to the heavy lane, answered like any other.
            _ => {
                let cands: Vec<u32> = (0..9_000u32)
                    .map(|_| rng.below(N_ITEMS as u64) as u32)
                    .collect();
                Case {
                    path: "/_gateway/models/recs/rank".into(),
                    expect: oracle.rank(Some(user), None, &cands),
                    body: json!({"user": user, "candidates": cands}),
                }
            }
        };
        out.push(case);
    }
    // Interleave the kinds so that batches really mix them.
    let n = out.len();
    for i in (1..n).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        out.swap(i, j);
    }
    out
}

fn check(case: &Case, got: &Got) -> Result<(), String> {
    let text = got.text();
    let ctx = || {
        format!(
            "{} {} -> {} {}",
            case.path,
            short(&case.body),
            got.status,
            short_str(&text)
        )
    };
    match &case.expect {
        Expect::Bad => {
            if got.status != 400 {
                return Err(format!("expected 400: {}", ctx()));
            }
            Ok(())
        }
        expect => {
            if got.status != 200 {
                return Err(format!("expected 200: {}", ctx()));
            }
            let v: Value = serde_json::from_str(&text).map_err(|e| format!("{e}: {}", ctx()))?;
            let hits: Vec<(u32, f32)> = v["results"]
                .as_array()
                .ok_or_else(ctx)?
                .iter()
                .map(|h| {
                    (
                        h["item"].as_u64().unwrap() as u32,
                        h["score"].as_f64().unwrap() as f32,
                    )
                })
                .collect();
            match expect {
                Expect::Ranked(want) => {
                    let mut want = want.clone();
                    let mut got_sorted = hits.clone();
                    want.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
                    got_sorted.sort_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)));
                    let same = want.len() == got_sorted.len()
                        && want
                            .iter()
                            .zip(&got_sorted)
                            .all(|(w, g)| w.0 == g.0 && close(g.1, w.1));
                    if !same {
                        return Err(format!("not this request's ranking: {}", ctx()));
                    }
                    if !hits.windows(2).all(|w| w[0].1 >= w[1].1) {
                        return Err(format!("not best first: {}", ctx()));
                    }
                }
                Expect::Top { k, all_scores } => {
                    if hits.len() != *k {
                        return Err(format!("expected {k} results: {}", ctx()));
                    }
                    for &(item, score) in &hits {
                        if !close(score, all_scores[item as usize]) {
                            return Err(format!(
                                "item {item} scored {score}, not {}: {}",
                                all_scores[item as usize],
                                ctx()
                            ));
                        }
                    }
                    let mut best = all_scores.clone();
                    best.sort_by(|a, b| b.total_cmp(a));
                    let lowest = hits.iter().map(|h| h.1).fold(f32::INFINITY, f32::min);
                    if !close(lowest, best[k - 1]) && lowest < best[k - 1] {
                        return Err(format!("not this query's top {k}: {}", ctx()));
                    }
                }
                Expect::Predicted(want) => {
                    let same = want.len() == hits.len()
                        && want
                            .iter()
                            .zip(&hits)
                            .all(|(w, g)| w.0 == g.0 && close(g.1, w.1));
                    if !same {
                        return Err(format!("not these rows' probabilities: {}", ctx()));
                    }
                }
                Expect::Bad => unreachable!(),
            }
            Ok(())
        }
    }
}

fn short(v: &Value) -> String {
    short_str(&v.to_string())
}

fn short_str(s: &str) -> String {
    s.chars().take(160).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mixed_concurrent_requests_each_get_their_own_answer() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let mut emb = SampleSpec::embedding(N_ITEMS, DIM, 7);
    emb.n_users = N_USERS;
    let emb = sample_model(&emb);
    let ctr = sample_model(&SampleSpec::mlp(N_USERS, N_ITEMS, 8));
    let recs_path = pki.path().join("recs.safetensors");
    let ctr_path = pki.path().join("ctr.safetensors");
    std::fs::write(&recs_path, &emb).unwrap();
    std::fs::write(&ctr_path, &ctr).unwrap();
    let oracle = Oracle {
        recs: Model::from_bytes(&emb, &ScoringConfig::default(), &ComputeDevice::Cpu).unwrap(),
        ctr: Model::from_bytes(&ctr, &ScoringConfig::default(), &ComputeDevice::Cpu).unwrap(),
    };
    // lavapipe when installed (CI), so batches run the kernels; a long queue delay so that
    // the concurrent requests really share batches.
    let toml = basic_config(
        &pki,
        &[up.addr],
        "",
        &format!(
            "[scoring]\nallow_software_gpu = true\nmax_batch = 64\nmax_queue_delay_us = 3000\n\
             [[models]]\nname = \"recs\"\npath = \"{}\"\n[[models]]\nname = \"ctr\"\npath = \"{}\"\n",
            recs_path.display(),
            ctr_path.display()
        ),
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let addr = gw.addr("https");

    let mut failures = Vec::new();
    for round in 0..3u64 {
        let cases = Arc::new(cases(&oracle, 100 + round));
        // All of a round on one h2 connection, at once, as the attack sent them.
        let conn = tls_connect(
            addr,
            &pki.ca_der,
            ClientOpts {
                alpn: &[b"h2"],
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let Sender::H2(h2) = conn.sender else {
            panic!("expected h2")
        };
        let mut tasks = Vec::new();
        for i in 0..cases.len() {
            let mut h2 = h2.clone();
            let cases = cases.clone();
            tasks.push(tokio::spawn(async move {
                let mut s = Sender::H2(h2.clone());
                h2.ready().await.unwrap();
                let c = &cases[i];
                s.send(post(&c.path, &c.body)).await.unwrap()
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let got = t.await.unwrap();
            if let Err(e) = check(&cases[i], &got) {
                failures.push(format!("round {round}, request {i}: {e}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} wrong answers:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The batcher really mixed operations: more than one request per batch on average.
    let hist = gw
        .registry
        .gather()
        .into_iter()
        .find(|f| f.name() == "gateway_model_batch_size")
        .expect("batch size histogram");
    let (mut batches, mut requests) = (0u64, 0.0);
    for m in hist.get_metric() {
        batches += m.get_histogram().get_sample_count();
        requests += m.get_histogram().get_sample_sum();
    }
    let batches = batches as f64;
    assert!(
        requests > batches,
        "requests were not batched ({requests} requests in {batches} batches)"
    );
}
