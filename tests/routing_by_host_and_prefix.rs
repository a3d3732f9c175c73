//! Routing: exact host beats wildcard beats any; longest path prefix on segment boundaries;
//! prefix stripping; 404 when nothing matches.

use crate::support::*;

#[tokio::test]
async fn host_and_prefix_choose_the_pool() {
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    let (exact, wild, api, any) = (
        Upstream::named("exact").await,
        Upstream::named("wild").await,
        Upstream::named("api").await,
        Upstream::named("any").await,
    );
    let toml = format!(
        r#"
admin.bind = "127.0.0.1:0"
[[tls.certificates]]
cert = "server.pem"
key = "server.key"
default = true
[[listeners]]
name = "https"
bind = "127.0.0.1:0"
[[upstreams]]
name = "exact"
backends = ["{}"]
[[upstreams]]
name = "wild"
backends = ["{}"]
[[upstreams]]
name = "api"
backends = ["{}"]
[[upstreams]]
name = "any"
backends = ["{}"]
[[routes]]
name = "exact"
hosts = ["www.shop.test"]
upstream = "exact"
[[routes]]
name = "wild"
hosts = ["*.shop.test"]
upstream = "wild"
[[routes]]
name = "api"
path_prefix = "/api/"
strip_prefix = true
upstream = "api"
[[routes]]
name = "any"
upstream = "any"
"#,
        exact.addr, wild.addr, api.addr, any.addr
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let addr = gw.addr("https");
    for h2 in [false, true] {
        let cases = [
            ("www.shop.test", "/api/x", "exact"),
            ("WWW.Shop.Test", "/", "exact"),
            ("m.shop.test", "/api/x", "wild"),
            ("other.test", "/api/items?q=1", "api"),
            ("other.test", "/api", "api"),
            ("other.test", "/apiary", "any"),
            ("other.test", "/", "any"),
        ];
        for (host, path, expect) in cases {
            let r = fetch(addr, &pki.ca_der, h2, get(host, path)).await;
            assert_eq!(r.text(), expect, "{host}{path} (h2: {h2})");
        }
    }
    assert_eq!(
        api.seen.lock().unwrap()[0]
            .uri
            .path_and_query()
            .unwrap()
            .as_str(),
        "/items?q=1"
    );
    assert_eq!(api.seen.lock().unwrap()[1].uri.path(), "/");
    assert_eq!(
        exact.seen.lock().unwrap()[1].headers.get("host").unwrap(),
        "WWW.Shop.Test",
        "Host is passed through as sent"
    );
}

#[tokio::test]
async fn no_matching_route_is_404_with_request_id() {
    let pki = Pki::new();
    pki.issue("server", &["localhost"]);
    let up = Upstream::named("a").await;
    let toml = basic_config(&pki, &[up.addr], "", "").replace(
        "name = \"all\"\nupstream = \"app\"",
        "name = \"all\"\nhosts = [\"shop.test\"]\nupstream = \"app\"",
    );
    let gw = TestGateway::start(&toml, pki.path()).await;
    let r = fetch(gw.addr("https"), &pki.ca_der, false, get("localhost", "/")).await;
    assert_eq!(r.status, 404);
    assert!(r.header("x-request-id").is_some());
    assert_eq!(up.hits(), 0);
    assert_eq!(
        gw.metric(
            "gateway_requests_total",
            &[("route", "unmatched"), ("status_class", "4xx")]
        ),
        1.0
    );
}
