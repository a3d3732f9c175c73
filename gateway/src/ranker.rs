//! The served models as the plugin host's `ranking` import sees them: the glue between the
//! scoring crate's model slots and the plugin host's [`Ranker`] trait (neither crate knows the
//! other).

use std::sync::Arc;

use crate::proxy::hooks::{RankFuture, Ranker};
use crate::scoring::serving::{Ask, ModelSlot, OwnedQuery};

/// The served models as the plugins' `ranking` import sees them.
pub struct ModelsRanker(pub std::collections::HashMap<String, Arc<ModelSlot>>);

impl Ranker for ModelsRanker {
    fn rank<'a>(&'a self, model: &'a str, user: u32, candidates: Vec<u32>) -> RankFuture<'a> {
        Box::pin(async move {
            let slot = self
                .0
                .get(model)
                .ok_or_else(|| format!("no model named {model:?}"))?;
            let order = candidates.clone();
            let answer = slot
                .ask(Ask::Rank {
                    query: OwnedQuery::User(user),
                    candidates,
                })
                .await
                .map_err(|e| e.to_string())?;
            // The answer is best first; give the scores back in the caller's order.
            let by_item: std::collections::HashMap<u32, f32> =
                answer.hits.iter().map(|h| (h.item, h.score)).collect();
            let scores = order
                .iter()
                .map(|i| by_item.get(i).copied())
                .collect::<Option<Vec<f32>>>()
                .ok_or_else(|| format!("model {model:?} did not score every candidate"))?;
            Ok((answer.version, scores))
        })
    }
}
