//! Offline evaluation: how well a model does on held-out interactions, scored on its CPU path
//! (whose answers equal the GPU's), with the metrics of [`gateway_rollout::offline`].
//!
//! The held-out file is JSON lines, one case per line (blank lines are skipped):
//!
//! - **ranking** lines, for embedding models: `{"user": 7, "relevant": [3, 9]}`, or graded
//!   `{"user": 7, "relevant": {"3": 2.0, "9": 1.0}}` (a grade of 0 is irrelevant), with an
//!   optional `"candidates": [...]`: those items are ranked, else the top `k` of the whole
//!   catalog. Figures: NDCG@k (primary), precision@k and recall@k, each the mean over lines
//!   (NDCG and recall over lines with a relevant item).
//! - **click-through** lines, for MLP models: `{"user": 7, "item": 3, "dense": [0.1, ...],
//!   "label": 1}` (`label` 0/1 or false/true; `dense` may be left out when the model takes
//!   no dense features). Figures: AUC (primary) and log-loss.
//!
//! A file holds one kind of line. Ids are the model's row indices and must exist in it.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;

use gateway_rollout::offline;
use serde_json::Value;

use crate::error::ScoringError;
use crate::format::ModelKind;
use crate::model::{CtrRow, Hit, Model, Query, RankRequest};

/// Why held-out data could not be read, or a model not evaluated on it.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// The file could not be read.
    #[error("reading {file}: {error}")]
    Io {
        /// The file, as given.
        file: String,
        /// What the filesystem said.
        error: std::io::Error,
    },
    /// A line is not a case of either kind.
    #[error("{file}:{line}: {problem}")]
    Line {
        /// The file, as given.
        file: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        problem: String,
    },
    /// The file holds no case.
    #[error("{file} holds no held-out case")]
    Empty {
        /// The file, as given.
        file: String,
    },
    /// The lines are of the kind another model kind is evaluated on.
    #[error("{file} holds {found} lines; an {model} model is evaluated on {expected} lines")]
    WrongKind {
        /// The file, as given.
        file: String,
        /// The model's kind.
        model: ModelKind,
        /// The kind of line the model needs.
        expected: &'static str,
        /// The kind of line the file holds.
        found: &'static str,
    },
    /// A line names a user or item the model does not have.
    #[error("{file}:{line}: unknown {what} id {id} (the model has {count} {what}s)")]
    UnknownId {
        /// The file, as given.
        file: String,
        /// 1-based line number.
        line: usize,
        /// `user` or `item`.
        what: &'static str,
        /// The id.
        id: u32,
        /// How many the model has.
        count: usize,
    },
    /// A line the model refused to score.
    #[error("{file}:{line}: {error}")]
    Scoring {
        /// The file, as given.
        file: String,
        /// 1-based line number.
        line: usize,
        /// The model's answer.
        error: ScoringError,
    },
    /// The primary metric is undefined on this data.
    #[error("{file}: {problem}")]
    Undefined {
        /// The file, as given.
        file: String,
        /// Why.
        problem: &'static str,
    },
    /// `k` is 0.
    #[error("k must be at least 1")]
    ZeroK,
}

/// Parsed held-out data: the cases of one kind, with their line numbers.
#[derive(Debug, Clone)]
pub struct HeldOut {
    file: String,
    cases: Cases,
}

#[derive(Debug, Clone)]
enum Cases {
    Ranking(Vec<RankingCase>),
    Ctr(Vec<CtrCase>),
}

#[derive(Debug, Clone)]
struct RankingCase {
    line: usize,
    user: u32,
    relevance: HashMap<u32, f64>,
    candidates: Option<Vec<u32>>,
}

#[derive(Debug, Clone)]
struct CtrCase {
    line: usize,
    user: u32,
    item: u32,
    dense: Vec<f32>,
    label: bool,
}

const RANKING: &str = "ranking";
const CTR: &str = "click-through";

impl HeldOut {
    /// Reads and parses a held-out file.
    pub fn load(path: &Path) -> Result<HeldOut, EvalError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| EvalError::Io {
            file: file.clone(),
            error,
        })?;
        HeldOut::parse(&text, &file)
    }

    /// Parses held-out JSON lines; `file` names the source in errors.
    pub fn parse(text: &str, file: &str) -> Result<HeldOut, EvalError> {
        let mut ranking = Vec::new();
        let mut ctr = Vec::new();
        let mut first: Option<(&'static str, usize)> = None;
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let bad = |problem: String| EvalError::Line {
                file: file.to_string(),
                line,
                problem,
            };
            let value: Value =
                serde_json::from_str(raw).map_err(|e| bad(format!("not JSON: {e}")))?;
            let Value::Object(fields) = value else {
                return Err(bad("expected a JSON object".into()));
            };
            let kind = match (
                fields.contains_key("relevant"),
                fields.contains_key("label"),
            ) {
                (true, false) => RANKING,
                (false, true) => CTR,
                (true, true) => {
                    return Err(bad(
                        "has both `relevant` (ranking) and `label` (click-through)".into(),
                    ))
                }
                (false, false) => {
                    return Err(bad(
                        "needs `relevant` (a ranking line) or `label` (a click-through line)"
                            .into(),
                    ))
                }
            };
            match first {
                None => first = Some((kind, line)),
                Some((k, at)) if k != kind => {
                    return Err(bad(format!(
                        "a {kind} line in a file of {k} lines (line {at} is one); use one kind \
                         per file"
                    )))
                }
                Some(_) => {}
            }
            if kind == RANKING {
                ranking.push(ranking_case(&fields, line).map_err(bad)?);
            } else {
                ctr.push(ctr_case(&fields, line).map_err(bad)?);
            }
        }
        let cases = match first {
            None => {
                return Err(EvalError::Empty {
                    file: file.to_string(),
                })
            }
            Some((RANKING, _)) => Cases::Ranking(ranking),
            Some(_) => Cases::Ctr(ctr),
        };
        Ok(HeldOut {
            file: file.to_string(),
            cases,
        })
    }

    /// The model kind these cases evaluate.
    pub fn kind(&self) -> ModelKind {
        match self.cases {
            Cases::Ranking(_) => ModelKind::Embedding,
            Cases::Ctr(_) => ModelKind::Mlp,
        }
    }

    /// Number of cases (lines).
    pub fn len(&self) -> usize {
        match &self.cases {
            Cases::Ranking(c) => c.len(),
            Cases::Ctr(c) => c.len(),
        }
    }

    /// Always false: parsing refuses a file without cases.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

type Fields = serde_json::Map<String, Value>;

fn check_fields(fields: &Fields, allowed: &[&str]) -> Result<(), String> {
    match fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "unknown field `{k}` (expected {})",
            allowed.join(", ")
        )),
        None => Ok(()),
    }
}

fn id(value: Option<&Value>, what: &str) -> Result<u32, String> {
    let v = value.ok_or_else(|| format!("missing `{what}`"))?;
    v.as_u64()
        .and_then(|n| u32::try_from(n).ok())
        .ok_or_else(|| format!("`{what}` must be an id (an integer 0..=4294967295), not {v}"))
}

fn ids(value: &Value, what: &str) -> Result<Vec<u32>, String> {
    let Value::Array(values) = value else {
        return Err(format!(
            "`{what}` must be an array of item ids, not {value}"
        ));
    };
    values.iter().map(|v| id(Some(v), what)).collect()
}

fn ranking_case(fields: &Fields, line: usize) -> Result<RankingCase, String> {
    check_fields(fields, &["user", "relevant", "candidates"])?;
    let user = id(fields.get("user"), "user")?;
    let relevance = match &fields["relevant"] {
        Value::Object(grades) => grades
            .iter()
            .map(|(item, grade)| {
                let item = item
                    .parse::<u32>()
                    .map_err(|_| format!("`relevant` key {item:?} is not an item id"))?;
                match grade.as_f64() {
                    Some(g) if g >= 0.0 => Ok((item, g)),
                    _ => Err(format!(
                        "`relevant` grade of item {item} must be a number at least 0, not {grade}"
                    )),
                }
            })
            .collect::<Result<HashMap<_, _>, _>>()?,
        other => ids(other, "relevant")?
            .into_iter()
            .map(|item| (item, 1.0))
            .collect(),
    };
    let candidates = fields
        .get("candidates")
        .map(|c| ids(c, "candidates"))
        .transpose()?;
    Ok(RankingCase {
        line,
        user,
        relevance,
        candidates,
    })
}

fn ctr_case(fields: &Fields, line: usize) -> Result<CtrCase, String> {
    check_fields(fields, &["user", "item", "dense", "label"])?;
    let user = id(fields.get("user"), "user")?;
    let item = id(fields.get("item"), "item")?;
    let dense = match fields.get("dense") {
        None => Vec::new(),
        Some(Value::Array(values)) => values
            .iter()
            .map(|v| match v.as_f64() {
                Some(x) if (x as f32).is_finite() => Ok(x as f32),
                _ => Err(format!(
                    "`dense` values must be finite f32 numbers, not {v}"
                )),
            })
            .collect::<Result<_, _>>()?,
        Some(other) => return Err(format!("`dense` must be an array of numbers, not {other}")),
    };
    let label = match &fields["label"] {
        Value::Bool(b) => *b,
        v if v.as_u64() == Some(0) => false,
        v if v.as_u64() == Some(1) => true,
        v => return Err(format!("`label` must be 0, 1, false or true, not {v}")),
    };
    Ok(CtrCase {
        line,
        user,
        item,
        dense,
        label,
    })
}

/// One figure of a [`Report`].
#[derive(Debug, Clone, PartialEq)]
pub struct Figure {
    /// Its name, e.g. `NDCG@10`, `AUC`, `log-loss`.
    pub name: String,
    /// Its value.
    pub value: f64,
}

/// The figures of one evaluation, the primary metric first (higher is better for it).
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// NDCG@k, precision@k, recall@k (ranking) or AUC, log-loss (click-through).
    pub figures: Vec<Figure>,
    /// Cases evaluated.
    pub cases: usize,
    /// `queries` (ranking) or `rows` (click-through).
    pub unit: &'static str,
}

impl Report {
    /// The metric the offline gate compares: NDCG@k for ranking, AUC for click-through.
    pub fn primary(&self) -> &Figure {
        &self.figures[0]
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, fig) in self.figures.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{} {:.4}", fig.name, fig.value)?;
        }
        write!(f, " over {} {}", self.cases, self.unit)
    }
}

/// Evaluates `model` on `data` with its CPU path: ranking cases at cutoff `k` (embedding
/// models), click-through cases (MLP models; `k` is not used). Blocks the thread for as long
/// as the scoring takes; async callers run it on a blocking thread.
pub fn evaluate(model: &Model, data: &HeldOut, k: usize) -> Result<Report, EvalError> {
    if k == 0 {
        return Err(EvalError::ZeroK);
    }
    match (&data.cases, model.kind()) {
        (Cases::Ranking(cases), ModelKind::Embedding) => rank_cases(model, &data.file, cases, k),
        (Cases::Ctr(cases), ModelKind::Mlp) => ctr_cases(model, &data.file, cases),
        (Cases::Ranking(_), kind) => Err(wrong_kind(&data.file, kind, RANKING)),
        (Cases::Ctr(_), kind) => Err(wrong_kind(&data.file, kind, CTR)),
    }
}

fn wrong_kind(file: &str, model: ModelKind, found: &'static str) -> EvalError {
    EvalError::WrongKind {
        file: file.to_string(),
        model,
        expected: match model {
            ModelKind::Embedding => RANKING,
            ModelKind::Mlp => CTR,
        },
        found,
    }
}

fn rank_cases(
    model: &Model,
    file: &str,
    cases: &[RankingCase],
    k: usize,
) -> Result<Report, EvalError> {
    let info = model.info();
    let unknown = |line, what, id, count| EvalError::UnknownId {
        file: file.to_string(),
        line,
        what,
        id,
        count,
    };
    for c in cases {
        if c.user as usize >= info.n_users {
            return Err(unknown(c.line, "user", c.user, info.n_users));
        }
        let items = c.relevance.keys().chain(c.candidates.iter().flatten());
        if let Some(&item) = items.filter(|&&i| i as usize >= info.n_items).min() {
            return Err(unknown(c.line, "item", item, info.n_items));
        }
    }
    let scoring = |line, error| EvalError::Scoring {
        file: file.to_string(),
        line,
        error,
    };
    let mut ranked: Vec<Option<Vec<u32>>> = vec![None; cases.len()];
    let open: Vec<usize> = (0..cases.len())
        .filter(|&i| cases[i].candidates.is_none())
        .collect();
    for chunk in open.chunks(model.batch_limits().max_queries.max(1)) {
        let queries: Vec<Query<'_>> = chunk.iter().map(|&i| Query::User(cases[i].user)).collect();
        let hits = model.top_k_cpu_any_k(&queries, k).map_err(|e| {
            let line = e
                .request()
                .map_or(cases[chunk[0]].line, |r| cases[chunk[r]].line);
            scoring(line, e)
        })?;
        for (&i, hits) in chunk.iter().zip(hits) {
            ranked[i] = Some(hits.into_iter().map(|h| h.item).collect());
        }
    }
    let per_call = model.batch_limits().max_candidates.max(1);
    for (i, c) in cases.iter().enumerate() {
        let Some(candidates) = &c.candidates else {
            continue;
        };
        let mut hits = Vec::with_capacity(candidates.len());
        for part in candidates.chunks(per_call) {
            let request = RankRequest {
                query: Query::User(c.user),
                candidates: part,
            };
            let scores = model.rank_cpu(&[request]).map_err(|e| scoring(c.line, e))?;
            hits.extend(
                part.iter()
                    .zip(&scores[0])
                    .map(|(&item, &score)| Hit { item, score }),
            );
        }
        hits.sort_by(crate::cpu::hit_order);
        ranked[i] = Some(hits.into_iter().map(|h| h.item).collect());
    }
    let queries: Vec<(Vec<u32>, HashMap<u32, f64>)> = ranked
        .into_iter()
        .zip(cases)
        .map(|(r, c)| (r.unwrap_or_default(), c.relevance.clone()))
        .collect();
    let ndcg = offline::mean_over_queries(&queries, |r, rel| offline::ndcg_at_k(r, rel, k)).ok_or(
        EvalError::Undefined {
            file: file.to_string(),
            problem: "no line has a relevant item, so NDCG is undefined",
        },
    )?;
    let precision =
        offline::mean_over_queries(&queries, |r, rel| Some(offline::precision_at_k(r, rel, k)))
            .unwrap_or(0.0);
    let recall = offline::mean_over_queries(&queries, |r, rel| offline::recall_at_k(r, rel, k))
        .unwrap_or(0.0);
    Ok(Report {
        figures: vec![
            Figure {
                name: format!("NDCG@{k}"),
                value: ndcg,
            },
            Figure {
                name: format!("precision@{k}"),
                value: precision,
            },
            Figure {
                name: format!("recall@{k}"),
                value: recall,
            },
        ],
        cases: cases.len(),
        unit: "queries",
    })
}

fn ctr_cases(model: &Model, file: &str, cases: &[CtrCase]) -> Result<Report, EvalError> {
    let info = model.info();
    for c in cases {
        for (what, id, count) in [
            ("user", c.user, info.n_users),
            ("item", c.item, info.n_items),
        ] {
            if id as usize >= count {
                return Err(EvalError::UnknownId {
                    file: file.to_string(),
                    line: c.line,
                    what,
                    id,
                    count,
                });
            }
        }
    }
    let mut probs = Vec::with_capacity(cases.len());
    for chunk in cases.chunks(model.batch_limits().max_rows.max(1)) {
        let rows: Vec<CtrRow<'_>> = chunk
            .iter()
            .map(|c| CtrRow {
                user: c.user,
                item: c.item,
                dense: &c.dense,
            })
            .collect();
        let p = model.predict_cpu(&rows).map_err(|e| EvalError::Scoring {
            file: file.to_string(),
            line: chunk[e.request().unwrap_or(0)].line,
            error: e,
        })?;
        probs.extend(p.into_iter().map(f64::from));
    }
    let labels: Vec<bool> = cases.iter().map(|c| c.label).collect();
    let auc = offline::auc(&probs, &labels).ok_or(EvalError::Undefined {
        file: file.to_string(),
        problem: "AUC needs at least one line with label 1 and one with label 0",
    })?;
    let log_loss = offline::log_loss(&probs, &labels).unwrap_or(f64::NAN);
    Ok(Report {
        figures: vec![
            Figure {
                name: "AUC".into(),
                value: auc,
            },
            Figure {
                name: "log-loss".into(),
                value: log_loss,
            },
        ],
        cases: cases.len(),
        unit: "rows",
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ScoringConfig;
    use crate::device::ComputeDevice;
    use crate::format::encode;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-6
    }

    /// Items 0..4 = (1,0), (0,1), (0.5,0.5), (-1,0); users 0..2 = (1,0.1), (0,1). User 0 ranks
    /// the catalog 0 (1.0), 2 (0.55), 1 (0.1), 3 (-1.0); user 1 ranks it 1 (1.0), 2 (0.5),
    /// then 0 and 3 (both 0, lower id first).
    fn tiny_embedding() -> Model {
        let items = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, -1.0, 0.0];
        let users = [1.0, 0.1, 0.0, 1.0];
        let meta = [
            ("kind", "embedding".to_string()),
            ("name", "tiny".into()),
            ("version", "1".into()),
            ("n_items", "4".into()),
            ("n_users", "2".into()),
            ("dim", "2".into()),
            ("similarity", "dot".into()),
        ];
        let bytes = encode(
            &meta,
            &[
                ("items", vec![4, 2], &items[..]),
                ("users", vec![2, 2], &users[..]),
            ],
        );
        Model::from_bytes(&bytes, &ScoringConfig::default(), &ComputeDevice::Cpu).unwrap()
    }

    /// One user (1,), one item (1,), no dense features, one layer with weights (1, 0) and
    /// bias b: p = sigmoid(user + b) whatever the item, so users rank by their value.
    fn tiny_mlp() -> Model {
        let users = [2.0, -1.0, 0.5];
        let items = [0.0, 0.0];
        let meta = [
            ("kind", "mlp".to_string()),
            ("name", "tiny-ctr".into()),
            ("version", "1".into()),
            ("n_items", "2".into()),
            ("n_users", "3".into()),
            ("user_dim", "1".into()),
            ("item_dim", "1".into()),
            ("n_dense", "0".into()),
            ("layers", "1".into()),
        ];
        let bytes = encode(
            &meta,
            &[
                ("users", vec![3, 1], &users[..]),
                ("items", vec![2, 1], &items[..]),
                ("w1", vec![1, 2], &[1.0, 0.0][..]),
                ("b1", vec![1], &[0.0][..]),
            ],
        );
        Model::from_bytes(&bytes, &ScoringConfig::default(), &ComputeDevice::Cpu).unwrap()
    }

    fn eval(model: &Model, text: &str, k: usize) -> Result<Report, EvalError> {
        evaluate(model, &HeldOut::parse(text, "heldout.jsonl")?, k)
    }

    #[test]
    fn ranking_figures_by_hand() {
        let m = tiny_embedding();
        // User 0's top 2 is [0, 2]: item 2 relevant at position 2, item 1 missed.
        // User 1's top 2 is [1, 2]: item 1 relevant at position 1.
        let r = eval(
            &m,
            "{\"user\": 0, \"relevant\": [2, 1]}\n\n{\"user\": 1, \"relevant\": [1]}\n",
            2,
        )
        .unwrap();
        let ndcg0 = (1.0 / 3f64.log2()) / (1.0 + 1.0 / 3f64.log2());
        assert_eq!(r.primary().name, "NDCG@2");
        assert!(close(r.primary().value, (ndcg0 + 1.0) / 2.0), "{r}");
        assert!(close(r.figures[1].value, (0.5 + 0.5) / 2.0), "{r}");
        assert!(close(r.figures[2].value, (0.5 + 1.0) / 2.0), "{r}");
        assert_eq!(r.cases, 2);
        assert_eq!(
            r.to_string(),
            format!(
                "NDCG@2 {:.4}, precision@2 0.5000, recall@2 0.7500 over 2 queries",
                (ndcg0 + 1.0) / 2.0
            )
        );
    }

    #[test]
    fn graded_relevance_and_candidates() {
        let m = tiny_embedding();
        // Candidates [3, 1] for user 0 rank 1 (0.1) before 3 (-1.0); grades 3 → 1, 1 → 2.
        let r = eval(
            &m,
            r#"{"user": 0, "relevant": {"3": 1, "1": 2}, "candidates": [3, 1]}"#,
            2,
        )
        .unwrap();
        assert!(close(r.primary().value, 1.0), "{r}");
        // Reversed grades: the ranking is the worst order.
        let r = eval(
            &m,
            r#"{"user": 0, "relevant": {"3": 2, "1": 1}, "candidates": [3, 1]}"#,
            2,
        )
        .unwrap();
        let expected = (1.0 + 2.0 / 3f64.log2()) / (2.0 + 1.0 / 3f64.log2());
        assert!(close(r.primary().value, expected), "{r}");
    }

    #[test]
    fn k_beyond_the_serving_limit_is_evaluated() {
        let m = tiny_embedding();
        assert!(m.batch_limits().max_k < 1000);
        let r = eval(&m, r#"{"user": 1, "relevant": [3]}"#, 1000).unwrap();
        // Item 3 is 4th for user 1: 1 / log2(5).
        assert!(close(r.primary().value, 1.0 / 5f64.log2()), "{r}");
        assert!(close(r.figures[1].value, 1.0 / 1000.0));
    }

    #[test]
    fn ctr_figures_by_hand() {
        let m = tiny_mlp();
        // p = sigmoid(2), sigmoid(-1), sigmoid(0.5). Labels 1, 0, 0: the positive scores
        // highest, so AUC 1.
        let r = eval(
            &m,
            "{\"user\": 0, \"item\": 1, \"label\": 1}\n{\"user\": 1, \"item\": 0, \"dense\": [], \"label\": 0}\n{\"user\": 2, \"item\": 1, \"label\": false}\n",
            10,
        )
        .unwrap();
        let s = |x: f64| 1.0 / (1.0 + (-x).exp());
        let ll = -((s(2.0)).ln() + (1.0 - s(-1.0)).ln() + (1.0 - s(0.5)).ln()) / 3.0;
        assert_eq!(r.primary().name, "AUC");
        assert!(close(r.primary().value, 1.0), "{r}");
        assert!(close(r.figures[1].value, ll), "{r}");
        assert_eq!(r.unit, "rows");
        // Labels 0, 0, 1: the positive (0.5) beats the negative at -1, not the one at 2.
        let r = eval(
            &m,
            "{\"user\": 0, \"item\": 1, \"label\": 0}\n{\"user\": 1, \"item\": 0, \"label\": 0}\n{\"user\": 2, \"item\": 1, \"label\": 1}\n",
            10,
        )
        .unwrap();
        assert!(close(r.primary().value, 0.5), "{r}");
    }

    #[test]
    fn bad_lines_name_the_line_and_the_problem() {
        let err = |text: &str| HeldOut::parse(text, "h.jsonl").unwrap_err().to_string();
        assert_eq!(
            err("{\"user\": 1, \"relevant\": [1]}\nnope"),
            "h.jsonl:2: not JSON: expected ident at line 1 column 2"
        );
        assert!(
            err("{\"user\": -1, \"relevant\": [1]}").starts_with("h.jsonl:1: `user` must be an id")
        );
        assert!(err("{\"user\": 1}").contains("needs `relevant`"));
        assert!(err("{\"user\": 1, \"relevant\": [1], \"label\": 1}").contains("both"));
        assert!(err("{\"user\": 1, \"relevant\": [1], \"cands\": []}")
            .contains("unknown field `cands`"));
        assert!(err("{\"user\": 1, \"relevant\": {\"x\": 1}}").contains("not an item id"));
        assert!(err("{\"user\": 1, \"item\": 2, \"label\": 2}").contains("`label` must be"));
        assert_eq!(
            err("{\"user\": 1, \"relevant\": [1]}\n{\"user\": 1, \"item\": 2, \"label\": 1}"),
            "h.jsonl:2: a click-through line in a file of ranking lines (line 1 is one); use \
             one kind per file"
        );
        assert_eq!(err("\n\n"), "h.jsonl holds no held-out case");
    }

    #[test]
    fn data_that_does_not_fit_the_model_is_refused() {
        let (emb, mlp) = (tiny_embedding(), tiny_mlp());
        let msg = |r: Result<Report, EvalError>| r.unwrap_err().to_string();
        assert_eq!(
            msg(eval(&emb, "{\"user\": 0, \"relevant\": [9]}", 2)),
            "heldout.jsonl:1: unknown item id 9 (the model has 4 items)"
        );
        assert_eq!(
            msg(eval(&emb, "{\"user\": 5, \"relevant\": [1]}", 2)),
            "heldout.jsonl:1: unknown user id 5 (the model has 2 users)"
        );
        assert_eq!(
            msg(eval(&emb, "{\"user\": 0, \"item\": 1, \"label\": 1}", 2)),
            "heldout.jsonl holds click-through lines; an embedding model is evaluated on \
             ranking lines"
        );
        assert!(matches!(
            eval(&mlp, "{\"user\": 0, \"relevant\": [1]}", 2),
            Err(EvalError::WrongKind { .. })
        ));
        assert!(msg(eval(&mlp, "{\"user\": 0, \"item\": 1, \"dense\": [1], \"label\": 1}\n{\"user\": 0, \"item\": 1, \"label\": 0}", 2))
            .starts_with("heldout.jsonl:1: request 0: 1 dense features"));
        assert!(matches!(
            eval(&mlp, "{\"user\": 0, \"item\": 1, \"label\": 1}", 2),
            Err(EvalError::Undefined { .. })
        ));
        assert!(matches!(
            eval(&emb, "{\"user\": 0, \"relevant\": []}", 2),
            Err(EvalError::Undefined { .. })
        ));
        assert!(matches!(
            eval(&emb, "{\"user\": 0, \"relevant\": [1]}", 0),
            Err(EvalError::ZeroK)
        ));
    }
}
