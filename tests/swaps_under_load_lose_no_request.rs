//! Hot swap under steady load: h1 and h2 clients over TLS keep requesting while plugins,
//! models, the config and the certificate are swapped well over 100 times. No request fails,
//! and every response comes from one consistent configuration: all responses stamped with
//! the same generation show the same plugin chain, and each names a version that existed.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::support::*;

#[tokio::test]
async fn swapping_everything_under_load_fails_nothing_and_mixes_nothing() {
    let pki = Pki::new();
    let up = Upstream::named("a").await;
    let (noop, ok) = (plugin_wasm("noop"), plugin_wasm("hostile"));
    let models: Vec<_> = (1..=2u64)
        .map(|seed| {
            let bytes = gateway::scoring::sample_model(&gateway::scoring::SampleSpec::embedding(
                50, 8, seed,
            ));
            let path = pki.path().join(format!("recs{seed}.safetensors"));
            std::fs::write(&path, &bytes).unwrap();
            (path, gateway::plugin::content_version(&bytes))
        })
        .collect();
    let ver = |p: &std::path::Path| gateway::plugin::content_version(&std::fs::read(p).unwrap());
    let config = |flip: bool| {
        let (first, second) = if flip { (&ok, &noop) } else { (&noop, &ok) };
        let plugins = format!(
            "[[plugins]]\nname = \"p1\"\npath = \"{}\"\nconfig = \"ok\"\ninstances = 2\n[[plugins]]\nname = \"p2\"\npath = \"{}\"\nconfig = \"ok\"\ninstances = 2\n",
            first.display(),
            second.display()
        );
        let model = &models[flip as usize].0;
        basic_config(
            &pki,
            &[up.addr],
            "",
            &format!(
                "plugins = [\"p1\", \"p2\"]\n{plugins}[[models]]\nname = \"recs\"\npath = \"{}\"\n",
                model.display()
            ),
        )
        .replace("[logging]", "[proxy]\nversion_headers = true\n[logging]")
    };
    let chains: HashSet<String> = [false, true]
        .into_iter()
        .map(|flip| {
            let (first, second) = if flip { (&ok, &noop) } else { (&noop, &ok) };
            format!("p1@{},p2@{}", ver(first), ver(second))
        })
        .collect();
    let model_versions: HashSet<String> = models.iter().map(|(_, v)| v.clone()).collect();

    let gw = TestGateway::start(&config(false), pki.path()).await;
    let addr = gw.addr("https");
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let seen: Arc<Mutex<HashMap<String, HashSet<String>>>> = Arc::default();
    let mut clients = Vec::new();
    for c in 0..6 {
        let (ca, stop, served, seen, chains, model_versions) = (
            pki.ca_der.clone(),
            stop.clone(),
            served.clone(),
            seen.clone(),
            chains.clone(),
            model_versions.clone(),
        );
        clients.push(tokio::spawn(async move {
            let alpn: &[&[u8]] = if c % 2 == 0 { &[b"h2"] } else { &[b"http/1.1"] };
            while !stop.load(Ordering::SeqCst) {
                // New connections now and then, so certificate swaps are exercised too.
                let mut conn = tls_connect(
                    addr,
                    &ca,
                    ClientOpts {
                        alpn,
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                for i in 0..15 {
                    let r = if i % 3 == 0 {
                        let req = Request::post("https://localhost/_gateway/models/recs/rank")
                            .header("host", "localhost")
                            .body(Full::new(Bytes::from_static(
                                br#"{"user": 1, "candidates": [1, 2, 3]}"#,
                            )))
                            .unwrap();
                        let r = conn.sender.send(req).await.unwrap();
                        assert!(
                            model_versions.contains(r.header("x-model-version").unwrap()),
                            "unknown model version"
                        );
                        r
                    } else {
                        let r = conn.sender.get("localhost", "/").await;
                        let chain = r.header("x-plugin-versions").unwrap().to_string();
                        assert!(chains.contains(&chain), "a half-applied chain: {chain}");
                        let generation = r.header("x-gateway-generation").unwrap().to_string();
                        seen.lock()
                            .unwrap()
                            .entry(generation)
                            .or_default()
                            .insert(chain);
                        r
                    };
                    assert_eq!(r.status, 200, "{}", r.text());
                    served.fetch_add(1, Ordering::SeqCst);
                }
            }
        }));
    }

    let mut swaps = 0;
    let slot = || gw.gateway.model("recs").unwrap();
    for i in 0..40 {
        // Plugins and the model flip together with the config.
        let flip = i % 2 == 0;
        gw.gateway
            .reload(gateway::Config::from_toml(&config(flip), "t.toml", pki.path()).unwrap())
            .await
            .unwrap();
        swaps += 3;
        let pause = || tokio::time::sleep(std::time::Duration::from_millis(4));
        pause().await;
        // A renewed certificate, applied by a reload of the same config.
        pki.issue("server", &["localhost"]);
        gw.gateway
            .reload(gateway::Config::from_toml(&config(flip), "t.toml", pki.path()).unwrap())
            .await
            .unwrap();
        swaps += 1;
        pause().await;
        // A model rollback and back again.
        slot().rollback(None).unwrap();
        pause().await;
        slot().rollback(None).unwrap();
        swaps += 2;
        pause().await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    stop.store(true, Ordering::SeqCst);
    for c in clients {
        c.await.unwrap();
    }
    assert!(swaps >= 100, "{swaps} swaps");
    let served = served.load(Ordering::SeqCst);
    assert!(
        served > 200,
        "only {served} requests were served during the swaps"
    );
    let seen = seen.lock().unwrap();
    for (generation, chains) in seen.iter() {
        assert_eq!(
            chains.len(),
            1,
            "generation {generation} served two plugin chains: {chains:?}"
        );
    }
    assert!(seen.len() > 10, "requests saw {} generations", seen.len());
}
