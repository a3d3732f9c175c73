//! The alert rules and the Grafana dashboard operators are given, checked the way Prometheus
//! and Grafana will read them: `promtool check rules` and `promtool test rules` pass on
//! `config/prometheus/`, every alert carries a severity, a summary, a description and a
//! runbook line and is unit-tested both firing and quiet, every PromQL expression of
//! `config/grafana/dashboard.json` parses once Grafana's variables are filled in, and every
//! series that the rules, their unit tests and the dashboard name, with the labels they use, is
//! one a running gateway exports (it is started here and driven until each family exists).
//!
//! promtool comes with the Debian package `prometheus` (`scripts/setup.sh` installs it); the
//! tests fail, naming that script, where it is missing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;

use crate::support::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn alerts_yml() -> PathBuf {
    root().join("config/prometheus/alerts.yml")
}

fn alerts_test_yml() -> PathBuf {
    root().join("config/prometheus/alerts_test.yml")
}

fn dashboard_json() -> PathBuf {
    root().join("config/grafana/dashboard.json")
}

/// The `promtool` on PATH; a missing one fails the test (never a silent pass).
fn promtool() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool is not installed: run scripts/setup.sh (it installs the Debian package \
                 `prometheus`, which ships promtool) to check config/prometheus/alerts.yml and \
                 config/grafana/dashboard.json"
            )
        })
}

/// Runs promtool; returns its output, or fails with it.
fn run_promtool(args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(promtool())
        .args(args)
        .output()
        .expect("running promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed:\n{text}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    text
}

// ---------------------------------------------------------------------------------------------
// Reading the YAML files. They are written in one plain style (block mappings, `expr: |` or a
// one-line expr); promtool validates their meaning, and the counts read here are checked
// against what promtool reports, so a rule this reader misses fails the test.

/// One alerting rule of alerts.yml, as far as these checks need it.
#[derive(Debug, Default, Clone)]
struct Rule {
    alert: String,
    expr: String,
    has_for: bool,
    severity: Option<String>,
    annotations: BTreeSet<String>,
}

fn indent(line: &str) -> usize {
    line.len() - line.trim_start().len()
}

fn unquote(v: &str) -> String {
    let v = v.trim();
    if v.len() >= 2
        && ((v.starts_with('"') && v.ends_with('"')) || (v.starts_with('\'') && v.ends_with('\'')))
    {
        v[1..v.len() - 1].to_string()
    } else {
        v.to_string()
    }
}

fn read_rules(text: &str) -> Vec<Rule> {
    let lines: Vec<&str> = text.lines().collect();
    let mut rules: Vec<Rule> = Vec::new();
    let mut section = "";
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let t = line.trim_start();
        i += 1;
        if t.starts_with('#') || t.is_empty() {
            continue;
        }
        if let Some(name) = t.strip_prefix("- alert:") {
            rules.push(Rule {
                alert: unquote(name),
                ..Rule::default()
            });
            section = "";
            continue;
        }
        let Some(rule) = rules.last_mut() else {
            continue;
        };
        if t.starts_with("- ") {
            // A rule of another kind (record:) ends the alert's block.
            section = "";
            continue;
        }
        let Some((key, value)) = t.split_once(':') else {
            continue;
        };
        match key {
            "expr" => {
                let v = value.trim();
                if v.starts_with('|') || v.starts_with('>') {
                    let base = indent(line);
                    let mut body = Vec::new();
                    while i < lines.len() && (lines[i].trim().is_empty() || indent(lines[i]) > base)
                    {
                        body.push(lines[i].trim());
                        i += 1;
                    }
                    rule.expr = body.join("\n").trim().to_string();
                } else {
                    rule.expr = unquote(v);
                }
            }
            "for" => rule.has_for = !value.trim().is_empty(),
            "labels" | "annotations" => section = if key == "labels" { "l" } else { "a" },
            "severity" if section == "l" => rule.severity = Some(unquote(value)),
            k if section == "a" => {
                rule.annotations.insert(k.to_string());
            }
            _ => {}
        }
    }
    rules
}

/// The evaluations of alerts_test.yml: (alertname, whether it expects alerts), and the input
/// series.
fn read_rule_tests(text: &str) -> (Vec<(String, bool)>, Vec<String>) {
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut evals = Vec::new();
    let mut series = Vec::new();
    for (n, t) in lines.iter().enumerate() {
        if let Some(name) = t.strip_prefix("alertname:") {
            let next = lines.get(n + 1).copied().unwrap_or_default();
            let fires = match next {
                "exp_alerts: []" => false,
                "exp_alerts:" => true,
                other => panic!("alertname {name} is followed by {other:?}, not exp_alerts"),
            };
            evals.push((unquote(name), fires));
        }
        if let Some(s) = t.strip_prefix("- series:") {
            series.push(unquote(s));
        }
    }
    (evals, series)
}

// ---------------------------------------------------------------------------------------------
// Reading PromQL: metric names, the labels their matchers use, the labels grouped by.

#[derive(Debug, Default, PartialEq)]
struct Names {
    /// Each series selector: its metric name and the label names its matchers use.
    selectors: Vec<(String, Vec<String>)>,
    /// Label names in `by (...)`, `without (...)`, `on (...)`, `ignoring (...)`,
    /// `group_left (...)`, `group_right (...)`.
    grouping: Vec<String>,
}

/// Words that are PromQL's own: aggregation operators (which may be followed by `by` rather
/// than a parenthesis), binary and set operators, modifiers and literals.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "start",
    "end",
    "inf",
    "nan",
];

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c == b':'
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b':'
}

/// Skips a quoted string starting at `i`; returns the index after it.
fn skip_string(b: &[u8], mut i: usize) -> usize {
    let quote = b[i];
    i += 1;
    while i < b.len() && b[i] != quote {
        if b[i] == b'\\' && quote != b'`' {
            i += 1;
        }
        i += 1;
    }
    i + 1
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

fn read_ident(b: &[u8], mut i: usize) -> (String, usize) {
    let start = i;
    while i < b.len() && is_ident(b[i]) {
        i += 1;
    }
    (String::from_utf8_lossy(&b[start..i]).into_owned(), i)
}

/// Reads `{label op "value", ...}` from the `{` at `i`; returns the label names and the index
/// after the `}`.
fn read_matchers(b: &[u8], mut i: usize) -> (Vec<String>, usize) {
    let mut labels = Vec::new();
    i += 1;
    loop {
        i = skip_ws(b, i);
        match b.get(i) {
            None => return (labels, i),
            Some(b'}') => return (labels, i + 1),
            Some(b',') => i += 1,
            Some(b'"') | Some(b'\'') | Some(b'`') => i = skip_string(b, i),
            Some(&c) if is_ident_start(c) => {
                let (name, next) = read_ident(b, i);
                labels.push(name);
                i = next;
            }
            Some(_) => i += 1,
        }
    }
}

fn promql_names(expr: &str) -> Names {
    let b = expr.as_bytes();
    let mut names = Names::default();
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'"' || c == b'\'' || c == b'`' {
            i = skip_string(b, i);
        } else if c == b'#' {
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
        } else if c == b'[' {
            // A range or subquery: durations, never names.
            while i < b.len() && b[i] != b']' {
                i += 1;
            }
        } else if c == b'{' {
            let (labels, next) = read_matchers(b, i);
            assert!(
                !labels.iter().any(|l| l == "__name__"),
                "selectors by __name__ are not checked: name the metric in {expr}"
            );
            i = next;
        } else if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit))
        {
            // A number or a duration: 0.05, 1e-3, 5m, 1h30m.
            while i < b.len() && (is_ident(b[i]) || b[i] == b'.') {
                if (b[i] == b'e' || b[i] == b'E') && matches!(b.get(i + 1), Some(b'+') | Some(b'-'))
                {
                    i += 1;
                }
                i += 1;
            }
        } else if is_ident_start(c) {
            let (word, next) = read_ident(b, i);
            let after = skip_ws(b, next);
            let lower = word.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if b.get(after) == Some(&b'(') {
                    let close = after
                        + b[after..]
                            .iter()
                            .position(|&x| x == b')')
                            .expect("closing parenthesis");
                    let list = String::from_utf8_lossy(&b[after + 1..close]);
                    names.grouping.extend(
                        list.split(',')
                            .map(str::trim)
                            .filter(|l| !l.is_empty())
                            .map(str::to_string),
                    );
                    i = close + 1;
                } else {
                    i = next;
                }
            } else if KEYWORDS.contains(&lower.as_str()) || b.get(after) == Some(&b'(') {
                // An operator, or a function call.
                i = next;
            } else if b.get(after) == Some(&b'{') {
                let (labels, end) = read_matchers(b, after);
                names.selectors.push((word, labels));
                i = end;
            } else {
                names.selectors.push((word, Vec::new()));
                i = next;
            }
        } else {
            i += 1;
        }
    }
    names
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let names = promql_names(
        r#"(
              sum by (job, instance, plugin, hook, outcome) (rate(gateway_plugin_invocations_total{outcome=~"trap|memory"}[5m]))
            / ignoring (outcome) group_left
              sum by (job, instance, plugin, hook) (rate(gateway_plugin_invocations_total[5m] offset 1h))
          ) > 1e-2
          and ignoring(outcome) max(up{job="gateway"}) without (instance) == 0"#,
    );
    assert_eq!(
        names,
        Names {
            selectors: vec![
                (
                    "gateway_plugin_invocations_total".into(),
                    vec!["outcome".into()]
                ),
                ("gateway_plugin_invocations_total".into(), vec![]),
                ("up".into(), vec!["job".into()]),
            ],
            grouping: [
                "job", "instance", "plugin", "hook", "outcome", "outcome", "job", "instance",
                "plugin", "hook", "outcome", "instance"
            ]
            .map(String::from)
            .to_vec(),
        }
    );
    let names = promql_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(gateway_request_duration_seconds_bucket{instance=~".*", route=~"a|b,c"}[1h30m]))) > bool 0.5 or vector(0) unless count_values("v", gateway_scoring_device_info)"#,
    );
    assert_eq!(
        names.selectors,
        vec![
            (
                "gateway_request_duration_seconds_bucket".into(),
                vec!["instance".into(), "route".into()]
            ),
            ("gateway_scoring_device_info".into(), vec![]),
        ]
    );
    assert_eq!(names.grouping, vec!["le".to_string()]);
}

// ---------------------------------------------------------------------------------------------
// The dashboard.

/// Every PromQL expression of the dashboard, with where it is: panel targets (rows' nested
/// panels too) and annotation queries (`expr`), and template variables' `label_values(...)`
/// (the selector and the label).
struct DashboardQueries {
    exprs: Vec<(String, String)>,
    label_values: Vec<(String, String, String)>,
}

fn dashboard_queries(dashboard: &serde_json::Value) -> DashboardQueries {
    fn walk(v: &serde_json::Value, place: &str, out: &mut Vec<(String, String)>) {
        match v {
            serde_json::Value::Object(map) => {
                let place = map
                    .get("title")
                    .or_else(|| map.get("name"))
                    .and_then(|t| t.as_str())
                    .map(|t| format!("{place} {t:?}"))
                    .unwrap_or_else(|| place.to_string());
                for (k, v) in map {
                    if k == "expr" {
                        out.push((
                            place.clone(),
                            v.as_str().expect("expr is a string").to_string(),
                        ));
                    } else {
                        walk(v, &place, out);
                    }
                }
            }
            serde_json::Value::Array(items) => items.iter().for_each(|i| walk(i, place, out)),
            _ => {}
        }
    }
    let mut exprs = Vec::new();
    walk(&dashboard["panels"], "panel", &mut exprs);
    walk(&dashboard["annotations"], "annotation", &mut exprs);
    let mut label_values = Vec::new();
    for var in dashboard["templating"]["list"]
        .as_array()
        .expect("templating")
    {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .expect("a query variable has a query");
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| {
                panic!(
                    "variable {}: only label_values(...) is checked",
                    var["name"]
                )
            });
        let (selector, label) = inner
            .rsplit_once(',')
            .expect("label_values(selector, label)");
        label_values.push((
            format!("variable {}", var["name"]),
            selector.trim().to_string(),
            label.trim().to_string(),
        ));
    }
    DashboardQueries {
        exprs,
        label_values,
    }
}

/// Fills in Grafana's variables as Grafana would before sending the query: the interval
/// variables become durations, the dashboard's own variables a regex matching everything
/// (they are multi-value with "All", so they may only be used with `=~` or `!~`).
fn fill_variables(expr: &str, place: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let tail = &rest[at + 1..];
        let (name, used) = if let Some(braced) = tail.strip_prefix('{') {
            let end = braced.find('}').expect("closing brace of ${...}");
            let name = braced[..end].split(':').next().unwrap();
            (name.to_string(), end + 2)
        } else {
            let len = tail
                .bytes()
                .take_while(|&c| c.is_ascii_alphanumeric() || c == b'_')
                .count();
            (tail[..len].to_string(), len)
        };
        assert!(!name.is_empty(), "{place}: a lone $ in {expr}");
        let value = match name.as_str() {
            "__rate_interval" => "5m",
            "__interval" => "1m",
            "__range" => "1h",
            n if n.starts_with("__") => panic!("{place}: unknown Grafana variable ${n} in {expr}"),
            _ => {
                assert!(
                    out.ends_with("=~\"") || out.ends_with("!~\""),
                    "{place}: ${name} must be matched as a regex (=~\"${name}\"), since it may \
                     hold several values: {expr}"
                );
                ".*"
            }
        };
        out.push_str(value);
        rest = &tail[used..];
    }
    out.push_str(rest);
    out
}

fn load_dashboard() -> serde_json::Value {
    let text = std::fs::read_to_string(dashboard_json()).expect("config/grafana/dashboard.json");
    serde_json::from_str(&text).expect("dashboard.json is JSON")
}

#[test]
fn every_dashboard_expression_parses_with_grafana_variables_filled_in() {
    let dashboard = load_dashboard();
    assert!(
        dashboard["schemaVersion"].as_u64().unwrap() >= 36,
        "a current Grafana schema"
    );
    let vars: Vec<&str> = dashboard["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    for v in ["DS_PROMETHEUS", "instance", "route"] {
        assert!(vars.contains(&v), "the dashboard has a ${v} variable");
    }
    // Every panel that queries shows something, from the chosen data source.
    let mut panels = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        panels.push(p);
        panels.extend(p["panels"].as_array().into_iter().flatten());
    }
    let queried: Vec<_> = panels.iter().filter(|p| p["type"] != "row").collect();
    assert!(queried.len() >= 20, "{} panels", queried.len());
    for p in queried {
        assert_eq!(
            p["datasource"]["uid"], "${DS_PROMETHEUS}",
            "panel {}",
            p["title"]
        );
        let targets = p["targets"].as_array().map(Vec::len).unwrap_or(0);
        assert!(targets > 0, "panel {} has no query", p["title"]);
    }

    let queries = dashboard_queries(&dashboard);
    assert!(!queries.exprs.is_empty());
    let mut rules = String::from("# Generated from config/grafana/dashboard.json\ngroups:\n  - name: dashboard\n    rules:\n");
    let mut n = 0;
    let mut add = |place: &str, expr: &str| {
        n += 1;
        let filled = fill_variables(expr, place);
        rules.push_str(&format!(
            "      # {}\n      - record: dashboard_expr_{n}\n        expr: {}\n",
            place.replace('\n', " "),
            serde_json::to_string(&filled).unwrap()
        ));
    };
    for (place, expr) in &queries.exprs {
        add(place, expr);
    }
    for (place, selector, _) in &queries.label_values {
        add(place, selector);
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_rules.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = run_promtool(&["check".as_ref(), "rules".as_ref(), file.as_os_str()]);
    assert!(
        out.contains(&format!("SUCCESS: {n} rules found")),
        "promtool read every expression ({n}):\n{out}\n{rules}"
    );
}

// ---------------------------------------------------------------------------------------------
// The alert rules.

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let rules = read_rules(&std::fs::read_to_string(alerts_yml()).unwrap());
    let out = run_promtool(&["check".as_ref(), "rules".as_ref(), alerts_yml().as_os_str()]);
    assert!(
        out.contains(&format!("SUCCESS: {} rules found", rules.len())),
        "promtool and this reader agree on the rules ({}):\n{out}",
        rules.len()
    );
    let out = run_promtool(&[
        "test".as_ref(),
        "rules".as_ref(),
        alerts_test_yml().as_os_str(),
    ]);
    assert!(out.contains("SUCCESS"), "{out}");
}

#[test]
fn every_alert_has_a_severity_a_runbook_and_tests_both_ways() {
    let rules = read_rules(&std::fs::read_to_string(alerts_yml()).unwrap());
    let (evals, _) = read_rule_tests(&std::fs::read_to_string(alerts_test_yml()).unwrap());
    // What the issue asks to be alerted on, by the series that says it.
    for needed in [
        "gateway_requests_total",
        "gateway_request_duration_seconds_bucket",
        "gateway_backend_healthy",
        "gateway_upstream_panic_total",
        "gateway_plugin_invocations_total",
        "gateway_model_cpu_fallbacks_total",
        "gateway_reload_failures_total",
        "gateway_tls_handshake_failures_total",
        "gateway_anomaly",
        "gateway_rollout_decisions_total",
        "up",
    ] {
        assert!(
            rules.iter().any(|r| promql_names(&r.expr)
                .selectors
                .iter()
                .any(|s| s.0 == needed)),
            "no alert on {needed}"
        );
    }
    for rule in &rules {
        let a = &rule.alert;
        assert!(!rule.expr.is_empty(), "{a}: expr");
        assert!(rule.has_for, "{a}: for:");
        assert!(
            matches!(
                rule.severity.as_deref(),
                Some("critical" | "warning" | "info")
            ),
            "{a}: severity {:?}",
            rule.severity
        );
        for k in ["summary", "description", "runbook"] {
            assert!(rule.annotations.contains(k), "{a}: annotation {k}");
        }
        assert!(
            evals.iter().any(|(n, fires)| n == a && *fires),
            "{a}: no unit test where it fires"
        );
        assert!(
            evals.iter().any(|(n, fires)| n == a && !*fires),
            "{a}: no unit test where it stays quiet"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Against a running gateway.

/// Sample names of a Prometheus text exposition (histograms as `_bucket`, `_sum`, `_count`),
/// each with the label names it carries.
fn exposition_names(text: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(at) => line.split_at(at),
            None => (line, ""),
        };
        let labels = out.entry(name.to_string()).or_default();
        if rest.starts_with('{') {
            labels.extend(read_matchers(rest.as_bytes(), 0).0);
        }
    }
    out
}

/// A series selector of a unit test (`name{a="b",...}`): its name and label names.
fn series_names(series: &str) -> (String, Vec<String>) {
    let b = series.as_bytes();
    let (name, at) = read_ident(b, 0);
    let labels = if b.get(at) == Some(&b'{') {
        read_matchers(b, at).0
    } else {
        Vec::new()
    };
    (name, labels)
}

/// Series Prometheus makes itself, not the gateway.
const PROMETHEUS_OWN: &[&str] = &["up", "ALERTS", "ALERTS_FOR_STATE"];
/// Labels a scrape adds to every series.
const TARGET_LABELS: &[&str] = &["job", "instance"];

/// Compares what PromQL names with what the gateway exports.
struct Checker {
    exported: BTreeMap<String, BTreeSet<String>>,
    problems: Vec<String>,
}

impl Checker {
    fn selector(&mut self, place: &str, name: &str, labels: &[String]) {
        if PROMETHEUS_OWN.contains(&name) {
            return;
        }
        let Some(has) = self.exported.get(name) else {
            self.problems
                .push(format!("{place}: {name} is not exported"));
            return;
        };
        for l in labels {
            if !has.contains(l) && !TARGET_LABELS.contains(&l.as_str()) {
                self.problems
                    .push(format!("{place}: {name} has no label {l} (it has {has:?})"));
            }
        }
    }

    /// Every selector's name and matcher labels, and the labels it groups by (which one of
    /// its series must have).
    fn expr(&mut self, place: &str, expr: &str) {
        let names = promql_names(expr);
        let mut known: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
        let mut own = false;
        for (name, labels) in &names.selectors {
            self.selector(place, name, labels);
            own |= PROMETHEUS_OWN.contains(&name.as_str());
            known.extend(self.exported.get(name).into_iter().flatten().cloned());
        }
        if !own {
            for l in &names.grouping {
                if !known.contains(l) {
                    self.problems.push(format!(
                        "{place}: groups by {l}, which none of its series has"
                    ));
                }
            }
        }
    }
}

const TOKEN: &str = "alerts-dashboard-token";

/// A gateway with everything the rules and the dashboard look at: routes with a plugin, an
/// experiment with a rollout, a model on the CPU path with an offline gate, a pool with a
/// dead backend, a flaky upstream.
async fn start_gateway(
    pki: &Pki,
    app: &Upstream,
    canary: &Upstream,
    flaky: &Upstream,
) -> TestGateway {
    pki.issue("server", &["localhost"]);
    std::fs::write(pki.path().join("admin.token"), TOKEN).unwrap();
    std::fs::write(
        pki.path().join("feedback.key"),
        "an-alerts-test-signing-secret\n",
    )
    .unwrap();
    let mut spec = gateway::scoring::SampleSpec::embedding(32, 8, 1);
    spec.n_users = 8;
    std::fs::write(
        pki.path().join("recs.safetensors"),
        gateway::scoring::sample_model(&spec),
    )
    .unwrap();
    let heldout: String = (0..8)
        .map(|u| format!("{{\"user\": {u}, \"relevant\": [{}, {}]}}\n", u, u + 8))
        .collect();
    std::fs::write(pki.path().join("heldout.jsonl"), heldout).unwrap();
    let dead = dead_port().await;
    let toml = format!(
        r#"
[server]
anomaly_interval_ms = 200

[admin]
bind = "127.0.0.1:0"
token_file = "admin.token"

[logging]
access_log = false

[limits]
max_body_bytes = 1024

[[tls.certificates]]
cert = "server.pem"
key = "server.key"
server_names = ["localhost"]

[[listeners]]
name = "https"
bind = "127.0.0.1:0"

[[upstreams]]
name = "app"
backends = ["{app}"]

[[upstreams]]
name = "canary"
backends = ["{canary}"]

[[upstreams]]
name = "pool"
backends = ["{app}", "{dead}"]
panic_threshold = 0.9
[upstreams.passive]
consecutive_failures = 1
ejection_ms = 60000

[[upstreams]]
name = "flaky"
backends = ["{flaky}"]

[[routes]]
name = "all"
upstream = "app"
plugins = ["noop"]

[[routes]]
name = "pool"
path_prefix = "/pool"
upstream = "pool"

[[routes]]
name = "flaky"
path_prefix = "/flaky"
upstream = "flaky"

{noop}

[scoring]
backend = "cpu"

[[models]]
name = "recs"
path = "recs.safetensors"
eval_data = "heldout.jsonl"
eval_k = 4

[feedback]
key_file = "feedback.key"

[[experiments]]
name = "exp"
routes = ["all"]
assign_by = "cookie:shopper"

[[experiments.variants]]
name = "a"

[[experiments.variants]]
name = "b"
upstream = "canary"

[experiments.rollout]
steps = [10, 50, 100]
min_step_s = 0
min_samples = 1000
evaluate_every_ms = 100
"#,
        app = app.addr,
        canary = canary.addr,
        flaky = flaky.addr,
        noop = plugin_table("noop", "noop", "", ""),
    );
    TestGateway::start(&toml, pki.path()).await
}

#[tokio::test]
async fn alerts_their_tests_and_the_dashboard_name_only_series_a_running_gateway_exports() {
    let pki = Pki::new();
    let app = Upstream::named("app").await;
    let canary = Upstream::with(|_| {
        Reply::Respond(StatusCode::OK, vec![], Bytes::from_static(b"canary-body"))
    })
    .await;
    let failing = Arc::new(AtomicBool::new(false));
    let flaky = {
        let failing = failing.clone();
        Upstream::with(move |_| {
            let status = if failing.load(Ordering::Relaxed) {
                StatusCode::INTERNAL_SERVER_ERROR
            } else {
                StatusCode::OK
            };
            Reply::Respond(status, vec![], Bytes::from_static(b"x"))
        })
        .await
    };
    let gw = start_gateway(&pki, &app, &canary, &flaky).await;
    let admin = gw.gateway.admin_addr();
    let mut conn = tls_connect(gw.addr("https"), &pki.ca_der, ClientOpts::default())
        .await
        .unwrap()
        .sender;

    // Shoppers of the experiment, through the plugin chain.
    for i in 0..20 {
        let mut req = get("localhost", "/p");
        req.headers_mut()
            .insert("cookie", format!("shopper=s{i}").parse().unwrap());
        assert_eq!(conn.send(req).await.unwrap().status, 200);
    }
    // The pool: its dead backend is ejected, requests are retried onto the live one, and
    // with one backend of two healthy (below the 0.9 threshold) the pool panics.
    for _ in 0..6 {
        let r = conn.send(get("localhost", "/pool/x")).await.unwrap();
        assert!(r.status == 200 || r.status == 502, "{}", r.status);
    }
    assert!(gw.metric("gateway_upstream_retries_total", &[("upstream", "pool")]) > 0.0);
    assert!(gw.metric("gateway_upstream_panic_total", &[("upstream", "pool")]) > 0.0);
    // A body over the limit.
    let big = Request::post("https://localhost/upload")
        .header("host", "localhost")
        .body(Full::new(Bytes::from(vec![b'x'; 4096])))
        .unwrap();
    assert_eq!(conn.send(big).await.unwrap().status, 413);
    // A model request, and an outcome event with a forged token.
    let rank = Request::post("https://localhost/_gateway/models/recs/rank")
        .header("host", "localhost")
        .body(Full::new(Bytes::from_static(
            b"{\"user\": 1, \"candidates\": [1, 2, 3]}",
        )))
        .unwrap();
    let r = conn.send(rank).await.unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let forged = Request::post("https://localhost/_gateway/feedback")
        .header("host", "localhost")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"events\": [{\"token\": \"forged\", \"event\": \"click\"}]}",
        )))
        .unwrap();
    conn.send(forged).await.unwrap();
    assert!(gw.metric("gateway_feedback_refused_total", &[]) > 0.0);
    // A reload of a broken file fails, and is counted.
    let broken = pki.path().join("broken.toml");
    std::fs::write(&broken, "this is [not a gateway config\n").unwrap();
    gw.gateway.set_config_path(&broken);
    let r = admin_call(admin, Method::POST, "/admin/reload", Some(TOKEN)).await;
    assert_eq!(r.status, 422, "{}", r.text());
    // An anomaly: steady traffic on the flaky route while the baseline learns (20 samples of
    // 200 ms), then it fails until the error ratio is in alert.
    let until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < until {
        assert_eq!(conn.get("localhost", "/flaky").await.status, 200);
    }
    failing.store(true, Ordering::Relaxed);
    let until = Instant::now() + Duration::from_secs(15);
    // The error ratio's series: the route's latency or rate may leave their baselines too on
    // a busy machine, and the sum over signals would count them.
    let error_ratio = [("route", "flaky"), ("signal", "error_ratio")];
    while Instant::now() < until && gw.metric("gateway_anomaly", &error_ratio) == 0.0 {
        conn.get("localhost", "/flaky").await;
    }
    assert_eq!(
        gw.metric("gateway_anomaly", &error_ratio),
        1.0,
        "the flaky route's error ratio left its baseline"
    );

    let scraped = admin_get(admin, "/metrics").await;
    assert_eq!(scraped.status, 200);
    let exported = exposition_names(&scraped.text());
    assert!(
        exported.contains_key("gateway_requests_total"),
        "{exported:?}"
    );

    let mut check = Checker {
        exported,
        problems: Vec::new(),
    };
    let rules = read_rules(&std::fs::read_to_string(alerts_yml()).unwrap());
    for rule in &rules {
        check.expr(&format!("alerts.yml {}", rule.alert), &rule.expr);
    }
    let dashboard = dashboard_queries(&load_dashboard());
    for (place, expr) in &dashboard.exprs {
        check.expr(
            &format!("dashboard.json {place}"),
            &fill_variables(expr, place),
        );
    }
    for (place, selector, label) in &dashboard.label_values {
        let selector = fill_variables(selector, place);
        check.expr(&format!("dashboard.json {place}"), &selector);
        let names = promql_names(&selector);
        let has = check.exported.get(&names.selectors[0].0);
        if !has.is_some_and(|h| h.contains(label)) && !TARGET_LABELS.contains(&label.as_str()) {
            check.problems.push(format!(
                "dashboard.json {place}: label_values of {label}, which {} does not have",
                names.selectors[0].0
            ));
        }
    }
    // The unit tests' input series have exactly the labels the gateway gives them (and the
    // scrape's job and instance).
    let (_, series) = read_rule_tests(&std::fs::read_to_string(alerts_test_yml()).unwrap());
    assert!(!series.is_empty());
    for s in &series {
        let (name, labels) = series_names(s);
        if PROMETHEUS_OWN.contains(&name.as_str()) {
            continue;
        }
        let Some(has) = check.exported.get(&name) else {
            check
                .problems
                .push(format!("alerts_test.yml: {name} is not exported"));
            continue;
        };
        let given: BTreeSet<String> = labels
            .into_iter()
            .filter(|l| !TARGET_LABELS.contains(&l.as_str()))
            .collect();
        if &given != has {
            check.problems.push(format!(
                "alerts_test.yml: {s} has labels {given:?}, the gateway exports {name} with {has:?}"
            ));
        }
    }
    let mut problems = check.problems;
    problems.sort();
    problems.dedup();
    assert!(
        problems.is_empty(),
        "series the rules or the dashboard name but the gateway does not export:\n{}",
        problems.join("\n")
    );
}
