//! `[feedback]` and `[[experiments]]`: checked after the routes, upstreams and models they
//! name.

use super::*;

/// The names experiments refer to, by kind.
pub(super) struct Names<'a> {
    pub(super) routes: &'a HashMap<String, usize>,
    pub(super) upstreams: &'a HashMap<String, usize>,
    pub(super) models: &'a HashMap<String, usize>,
    pub(super) plugins: &'a HashMap<String, usize>,
}

/// `[feedback]`; the key files are read in the file phase. `experiments` says whether any
/// experiment needs a signing key.
pub(super) fn feedback(
    c: &mut Checker,
    raw: RawFeedback,
    base_dir: &Path,
    experiments: bool,
) -> FeedbackSettings {
    use Seg::{Index, Key};
    let path = raw
        .path
        .unwrap_or_else(|| FeedbackSettings::DEFAULT_PATH.to_string());
    if !path.starts_with('/') || path.len() < 2 || path.contains(['?', '#']) {
        c.fail(
            vec![Key("feedback"), Key("path")],
            format!("{path:?} must be a path starting with \"/\", not \"/\" itself, without query"),
        );
    }
    match &raw.key_file {
        Some(file) => c.read(Read::FeedbackKey {
            field: vec![Key("feedback"), Key("key_file")],
            path: resolve(base_dir, file),
            shown: file.clone(),
        }),
        None if experiments => c.fail(
            vec![Key("feedback"), Key("key_file")],
            "experiments sign attribution tokens: set key_file to a file holding a secret of at least 16 bytes (e.g. `openssl rand -hex 32`)",
        ),
        None => {}
    }
    for (i, file) in raw.old_key_files.iter().flatten().enumerate() {
        c.read(Read::FeedbackKey {
            field: vec![Key("feedback"), Key("old_key_files"), Index(i)],
            path: resolve(base_dir, file),
            shown: file.clone(),
        });
    }
    let max_age = raw.token_max_age_s.unwrap_or(86_400);
    if max_age == 0 || max_age > 90 * 86_400 {
        c.fail(
            vec![Key("feedback"), Key("token_max_age_s")],
            "must be between 1 and 7776000 seconds (90 days)",
        );
    }
    let max_events = raw.max_events_per_request.unwrap_or(1000);
    if !(1..=100_000).contains(&max_events) {
        c.fail(
            vec![Key("feedback"), Key("max_events_per_request")],
            "must be between 1 and 100000",
        );
    }
    FeedbackSettings {
        path,
        keys: Vec::new(),
        token_max_age: Duration::from_secs(max_age),
        max_events_per_request: max_events,
    }
}

/// `[[experiments]]`; marks each route it splits with the experiment's index.
pub(super) fn experiments(
    c: &mut Checker,
    raw: Vec<RawExperiment>,
    names: &Names<'_>,
    routes: &mut [RouteSpec],
) -> Vec<ExperimentSpec> {
    use Seg::{Index, Key};
    let mut out = Vec::new();
    let mut seen = HashMap::new();
    for (i, re) in raw.into_iter().enumerate() {
        let at = |f: &'static str| vec![Key("experiments"), Index(i), Key(f)];
        check_name(c, at("name"), &re.name, &mut seen, i, "experiment");
        if re.name.len() > 64 {
            c.fail(at("name"), "must be at most 64 bytes (tokens carry it)");
        }
        let serves_models = re
            .variants
            .iter()
            .any(|v| v.models.as_ref().is_some_and(|m| !m.is_empty()));
        if re.routes.is_empty() && !serves_models {
            c.fail(
                at("routes"),
                "list at least one route to split, or give a variant `models` to split the scoring endpoint's requests",
            );
        }
        let mut split = Vec::new();
        for (j, name) in re.routes.iter().enumerate() {
            let field = vec![Key("experiments"), Index(i), Key("routes"), Index(j)];
            match names.routes.get(name) {
                None => c.fail(field, format!("no route named {name:?}")),
                Some(&r) => match routes[r].experiment {
                    Some(other) => c.fail(
                        field,
                        format!("route {name:?} is already split by experiments[{other}]; a route is in at most one experiment"),
                    ),
                    None if !routes[r].variants.is_empty() => c.fail(
                        field,
                        format!("route {name:?} has `variants`; a route in an experiment takes its variants from the experiment, so remove them"),
                    ),
                    None => {
                        routes[r].experiment = Some(i);
                        split.push(r);
                    }
                },
            }
        }
        let assign_by = shopper_key(c, at("assign_by"), &re.assign_by);
        let override_header = match HeaderName::from_bytes(
            re.override_header
                .as_deref()
                .unwrap_or(ExperimentSpec::DEFAULT_OVERRIDE_HEADER)
                .as_bytes(),
        ) {
            Ok(h) => h,
            Err(_) => {
                c.fail(at("override_header"), "not a valid HTTP header name");
                HeaderName::from_static(ExperimentSpec::DEFAULT_OVERRIDE_HEADER)
            }
        };
        if re.variants.len() < 2 {
            c.fail(
                at("variants"),
                "an experiment needs at least two [[experiments.variants]]: the baseline first",
            );
        }
        let mut variant_names = HashMap::new();
        let mut variants = Vec::new();
        for (j, rv) in re.variants.into_iter().enumerate() {
            let vat = |f: &'static str| {
                vec![
                    Key("experiments"),
                    Index(i),
                    Key("variants"),
                    Index(j),
                    Key(f),
                ]
            };
            check_name(c, vat("name"), &rv.name, &mut variant_names, j, "variant");
            if rv.name.len() > 64 {
                c.fail(vat("name"), "must be at most 64 bytes (tokens carry it)");
            }
            let weight = rv.weight.unwrap_or(1);
            if weight > 1_000_000 {
                c.fail(vat("weight"), "must be at most 1000000");
            }
            let upstream = rv
                .upstream
                .as_ref()
                .and_then(|u| match names.upstreams.get(u) {
                    Some(&idx) => Some(idx),
                    None => {
                        c.fail(vat("upstream"), format!("no upstream named {u:?}"));
                        None
                    }
                });
            let plugins = rv.plugins.as_ref().map(|list| {
                let mut chain = Vec::new();
                for (k, name) in list.iter().enumerate() {
                    let field = vec![
                        Key("experiments"),
                        Index(i),
                        Key("variants"),
                        Index(j),
                        Key("plugins"),
                        Index(k),
                    ];
                    match names.plugins.get(name) {
                        Some(&idx) if !chain.contains(&idx) => chain.push(idx),
                        Some(_) => c.fail(field, format!("plugin {name:?} is listed twice")),
                        None => c.fail(
                            field,
                            format!("no plugin named {name:?}; add a [[plugins]] table for it"),
                        ),
                    }
                }
                chain
            });
            let mut models = Vec::new();
            for (served, name) in rv.models.iter().flatten() {
                match (names.models.get(served), names.models.get(name)) {
                    (Some(_), Some(&idx)) => models.push((served.clone(), idx)),
                    (None, _) => c.fail(
                        vat("models"),
                        format!("{served:?} is not a [[models]] name; a variant can only serve a configured model in place of another"),
                    ),
                    (_, None) => c.fail(
                        vat("models"),
                        format!("{name:?} (in place of {served:?}) is not a [[models]] name"),
                    ),
                }
            }
            variants.push(VariantSpec {
                name: rv.name,
                weight,
                upstream,
                plugins,
                models,
            });
        }
        if !variants.is_empty() && variants.iter().all(|v| v.weight == 0) && re.rollout.is_none() {
            c.fail(at("variants"), "every weight is 0: no variant would serve");
        }
        let rollout = re.rollout.map(|rr| rollout(c, i, rr));
        out.push(ExperimentSpec {
            name: re.name,
            routes: split,
            assign_by,
            override_header,
            variants,
            rollout,
        });
    }
    out
}

fn shopper_key(c: &mut Checker, field: Vec<Seg>, text: &str) -> ShopperKey {
    let fallback = ShopperKey::Query(String::from("-"));
    let Some((kind, name)) = text.split_once(':') else {
        c.fail(
            field,
            format!("{text:?} must be `cookie:NAME`, `header:NAME` or `query:NAME`"),
        );
        return fallback;
    };
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if !name_ok {
        c.fail(
            field,
            format!("{name:?} must be a non-empty name of letters, digits, '-', '_' and '.'"),
        );
        return fallback;
    }
    match kind {
        "cookie" => ShopperKey::Cookie(name.to_string()),
        "query" => ShopperKey::Query(name.to_string()),
        "header" => match HeaderName::from_bytes(name.as_bytes()) {
            Ok(h) => ShopperKey::Header(h),
            Err(_) => {
                c.fail(field, format!("{name:?} is not a valid HTTP header name"));
                fallback
            }
        },
        other => {
            c.fail(
                field,
                format!(
                    "unknown source {other:?}; use `cookie:NAME`, `header:NAME` or `query:NAME`"
                ),
            );
            fallback
        }
    }
}

fn rollout(c: &mut Checker, i: usize, rr: RawRollout) -> RolloutSpec {
    use gateway_rollout::{Guards, Plan, SeqGuard};
    use Seg::{Index, Key};
    let at = |f: &'static str| vec![Key("experiments"), Index(i), Key("rollout"), Key(f)];
    let guard = |alpha: Option<f64>, margin: Option<f64>| {
        let alpha = alpha.unwrap_or(0.05);
        (alpha != 0.0).then(|| SeqGuard::new(alpha, margin.unwrap_or(0.0)))
    };
    let plan = Plan {
        steps: rr.steps.unwrap_or_else(|| vec![5, 25, 50, 100]),
        min_step_ms: rr.min_step_s.unwrap_or(600).saturating_mul(1000),
        min_samples: rr.min_samples.unwrap_or(1000),
        guards: Guards {
            max_error_rate_delta: rr.max_error_rate_delta.unwrap_or(0.01),
            max_p99_ratio: rr.max_p99_ratio.unwrap_or(1.5),
            ctr: guard(rr.ctr_alpha, rr.ctr_margin),
            cvr: guard(rr.cvr_alpha, rr.cvr_margin),
            max_psi: rr.max_psi,
        },
    };
    if let Err(e) = plan.validate() {
        // The plan's field names, in the file's spelling.
        let field = match e.field {
            "steps" => "steps",
            "min_samples" => "min_samples",
            "guards.max_error_rate_delta" => "max_error_rate_delta",
            "guards.max_p99_ratio" => "max_p99_ratio",
            "guards.ctr.alpha" | "guards.ctr.tau" => "ctr_alpha",
            "guards.ctr.margin" => "ctr_margin",
            "guards.cvr.alpha" | "guards.cvr.tau" => "cvr_alpha",
            "guards.cvr.margin" => "cvr_margin",
            "guards.max_psi" => "max_psi",
            _ => "steps",
        };
        c.fail(at(field), e.problem);
    }
    let every = rr.evaluate_every_ms.unwrap_or(5000);
    if !(100..=3_600_000).contains(&every) {
        c.fail(
            at("evaluate_every_ms"),
            "must be between 100 and 3600000 milliseconds",
        );
    }
    RolloutSpec {
        plan,
        evaluate_every: Duration::from_millis(every),
    }
}
