//! Offline metrics for judging a model on labelled data before it takes any traffic.
//!
//! Ranking metrics take a ranked list of item ids and the relevance of the items that matter
//! (`1.0` for plain relevant/irrelevant judgments, grades such as 1–3 for graded ones;
//! missing or ≤ 0 is irrelevant). An item ranked twice counts once, at its first position.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// The fraction of the top `k` positions holding a relevant item (divided by `k` even when
/// fewer than `k` items are ranked); 0 for `k = 0`.
pub fn precision_at_k<T: Eq + Hash>(ranked: &[T], relevance: &HashMap<T, f64>, k: usize) -> f64 {
    if k == 0 {
        return 0.0;
    }
    top_k(ranked, k)
        .filter(|item| gain(relevance, item) > 0.0)
        .count() as f64
        / k as f64
}

/// The fraction of the relevant items found in the top `k`; `None` with no relevant item.
pub fn recall_at_k<T: Eq + Hash>(
    ranked: &[T],
    relevance: &HashMap<T, f64>,
    k: usize,
) -> Option<f64> {
    let relevant = relevance.values().filter(|&&g| g > 0.0).count();
    if relevant == 0 {
        return None;
    }
    let found = top_k(ranked, k)
        .filter(|item| gain(relevance, item) > 0.0)
        .count();
    Some(found as f64 / relevant as f64)
}

/// Normalised discounted cumulative gain of the top `k`, with linear gains:
/// `Σ rel_i / log2(i + 1)` over positions `i = 1..=k`, divided by the same sum for the ideal
/// order; `None` with no relevant item.
pub fn ndcg_at_k<T: Eq + Hash>(ranked: &[T], relevance: &HashMap<T, f64>, k: usize) -> Option<f64> {
    let discount = |position: usize| 1.0 / (position as f64 + 2.0).log2();
    let dcg: f64 = top_k(ranked, k)
        .enumerate()
        .map(|(i, item)| gain(relevance, item) * discount(i))
        .sum();
    let mut ideal: Vec<f64> = relevance.values().copied().filter(|&g| g > 0.0).collect();
    if ideal.is_empty() {
        return None;
    }
    ideal.sort_by(|a, b| b.total_cmp(a));
    let idcg: f64 = ideal
        .iter()
        .take(k)
        .enumerate()
        .map(|(i, g)| g * discount(i))
        .sum();
    Some(if idcg > 0.0 { dcg / idcg } else { 0.0 })
}

/// The mean of a ranking metric over queries: `(ranked, relevance)` pairs. Queries for which
/// the metric is undefined (no relevant item) are left out; `None` if all are.
pub fn mean_over_queries<T, F>(queries: &[(Vec<T>, HashMap<T, f64>)], metric: F) -> Option<f64>
where
    F: Fn(&[T], &HashMap<T, f64>) -> Option<f64>,
{
    let values: Vec<f64> = queries
        .iter()
        .filter_map(|(ranked, relevance)| metric(ranked, relevance))
        .collect();
    (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
}

fn top_k<T: Eq + Hash>(ranked: &[T], k: usize) -> impl Iterator<Item = &T> {
    let mut seen = HashSet::new();
    ranked.iter().filter(move |item| seen.insert(*item)).take(k)
}

fn gain<T: Eq + Hash>(relevance: &HashMap<T, f64>, item: &T) -> f64 {
    relevance
        .get(item)
        .copied()
        .filter(|&g| g > 0.0)
        .unwrap_or(0.0)
}

/// The area under the ROC curve: the chance a random positive scores above a random negative,
/// ties counting half (from average ranks). `None` when a class is absent or the lengths
/// differ.
pub fn auc(scores: &[f64], labels: &[bool]) -> Option<f64> {
    if scores.len() != labels.len() {
        return None;
    }
    let positives = labels.iter().filter(|&&l| l).count();
    let negatives = labels.len() - positives;
    if positives == 0 || negatives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut positive_rank_sum = 0.0;
    let mut start = 0;
    while start < order.len() {
        let mut end = start + 1;
        while end < order.len() && scores[order[end]] == scores[order[start]] {
            end += 1;
        }
        let average_rank = (start + end + 1) as f64 / 2.0;
        let tied_positives = order[start..end].iter().filter(|&&i| labels[i]).count();
        positive_rank_sum += average_rank * tied_positives as f64;
        start = end;
    }
    let (p, n) = (positives as f64, negatives as f64);
    Some((positive_rank_sum - p * (p + 1.0) / 2.0) / (p * n))
}

/// Probabilities are clamped to `[LOG_LOSS_CLAMP, 1 − LOG_LOSS_CLAMP]` so a confident miss
/// costs about 34.5 rather than infinity.
pub const LOG_LOSS_CLAMP: f64 = 1e-15;

/// The mean negative log-likelihood of `labels` under `probs` (natural log); `None` when
/// empty or the lengths differ.
pub fn log_loss(probs: &[f64], labels: &[bool]) -> Option<f64> {
    if probs.is_empty() || probs.len() != labels.len() {
        return None;
    }
    let total: f64 = probs
        .iter()
        .zip(labels)
        .map(|(&p, &label)| {
            let p = p.clamp(LOG_LOSS_CLAMP, 1.0 - LOG_LOSS_CLAMP);
            -if label { p.ln() } else { (1.0 - p).ln() }
        })
        .sum();
    Some(total / probs.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    fn judged(pairs: &[(&'static str, f64)]) -> HashMap<&'static str, f64> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn precision_and_recall() {
        let rel = judged(&[("a", 1.0), ("c", 1.0), ("x", 1.0), ("z", 0.0)]);
        let ranked = ["a", "b", "c", "d", "z"];
        assert!(close(precision_at_k(&ranked, &rel, 1), 1.0));
        assert!(close(precision_at_k(&ranked, &rel, 3), 2.0 / 3.0));
        assert!(close(precision_at_k(&ranked, &rel, 10), 0.2));
        assert_eq!(precision_at_k(&ranked, &rel, 0), 0.0);
        assert!(close(recall_at_k(&ranked, &rel, 3).unwrap(), 2.0 / 3.0));
        assert!(close(recall_at_k(&ranked, &rel, 1).unwrap(), 1.0 / 3.0));
        assert_eq!(recall_at_k(&ranked, &judged(&[("z", 0.0)]), 3), None);
        let repeated = ["a", "a", "a"];
        assert!(close(precision_at_k(&repeated, &rel, 3), 1.0 / 3.0));
    }

    #[test]
    fn ndcg_by_hand() {
        // Gains 3, 2, 0, 1 at positions 1..4 (items a, b, c, d); ideal order 3, 2, 1.
        let rel = judged(&[("a", 3.0), ("b", 2.0), ("d", 1.0)]);
        let ranked = ["a", "b", "c", "d"];
        let dcg = 3.0 + 2.0 / 3f64.log2() + 1.0 / 5f64.log2();
        let idcg = 3.0 + 2.0 / 3f64.log2() + 1.0 / 4f64.log2();
        assert!(close(ndcg_at_k(&ranked, &rel, 4).unwrap(), dcg / idcg));
        assert!(close(ndcg_at_k(&ranked, &rel, 2).unwrap(), 1.0));
        let reversed = ["d", "c", "b", "a"];
        let dcg_rev = 1.0 + 2.0 / 4f64.log2() + 3.0 / 5f64.log2();
        let idcg_4 = idcg;
        assert!(close(
            ndcg_at_k(&reversed, &rel, 4).unwrap(),
            dcg_rev / idcg_4
        ));
        assert_eq!(ndcg_at_k(&ranked, &judged(&[]), 4), None);
        assert_eq!(ndcg_at_k(&["q"], &rel, 1), Some(0.0));
    }

    #[test]
    fn means_skip_undefined_queries() {
        let queries = vec![
            (vec!["a", "b"], judged(&[("a", 1.0)])),
            (vec!["a", "b"], judged(&[("b", 1.0)])),
            (vec!["a", "b"], judged(&[])),
        ];
        let recall_1 = mean_over_queries(&queries, |r, rel| recall_at_k(r, rel, 1));
        assert!(close(recall_1.unwrap(), 0.5));
        let p1 = mean_over_queries(&queries, |r, rel| Some(precision_at_k(r, rel, 1)));
        assert!(close(p1.unwrap(), 1.0 / 3.0));
        assert_eq!(
            mean_over_queries(&queries[2..], |r, rel| ndcg_at_k(r, rel, 2)),
            None
        );
    }

    #[test]
    fn auc_by_hand() {
        assert_eq!(
            auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            Some(0.75)
        );
        assert_eq!(auc(&[0.9, 0.1], &[true, false]), Some(1.0));
        assert_eq!(auc(&[0.9, 0.1], &[false, true]), Some(0.0));
        // All tied: every pair counts half.
        assert_eq!(auc(&[0.5; 4], &[true, false, true, false]), Some(0.5));
        // Positive 0.5 ties one negative (half) and beats another: (1 + 0.5) / 2.
        assert_eq!(auc(&[0.5, 0.5, 0.2], &[true, false, false]), Some(0.75));
        assert_eq!(auc(&[0.1, 0.2], &[true, true]), None);
        assert_eq!(auc(&[0.1], &[true, false]), None);
    }

    #[test]
    fn log_loss_by_hand() {
        let expected = -(0.8f64.ln() + 0.6f64.ln()) / 2.0;
        assert!(close(
            log_loss(&[0.8, 0.4], &[true, false]).unwrap(),
            expected
        ));
        let clamped = log_loss(&[0.0, 1.0], &[true, false]).unwrap();
        assert!((clamped + LOG_LOSS_CLAMP.ln()).abs() < 0.2, "{clamped}");
        assert_eq!(log_loss(&[], &[]), None);
        assert_eq!(log_loss(&[0.5], &[]), None);
    }
}
