//! Rollouts over time: judging each experiment's canary at its interval, recording every
//! decision (log, metrics, the durable store) and applying operators' commands.
//!
//! A rollout is persisted in the store (`[store] dir`, `state/<experiment>.json`) at every
//! decision and once a minute while it runs, and resumed from there after a restart when the
//! configuration still names the same variants under the same plan. Without a store it lives
//! in memory only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gateway_rollout::{Decision, Rollout};

use crate::config::Config;
use crate::loader::blocking;
use crate::proxy::experiment::{now_ms, Command, CommandError, Experiment};
use crate::server::ServeCtx;
use crate::store::Store;

/// How often a running rollout is saved when nothing was decided.
const SAVE_EVERY: Duration = Duration::from_secs(60);

/// The rollouts the store holds, by experiment name; unreadable ones are logged and skipped
/// (their experiment starts a new rollout).
pub(crate) async fn persisted(config: &Config) -> HashMap<String, Rollout> {
    let Some(dir) = config.store_dir.clone() else {
        return HashMap::new();
    };
    if config.experiments.iter().all(|e| e.rollout.is_none()) {
        return HashMap::new();
    }
    let records = blocking(move || Store::open(&dir).and_then(|s| s.records())).await;
    let records = match records {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read saved rollouts; rollouts start afresh");
            return HashMap::new();
        }
    };
    records
        .into_iter()
        .filter_map(|(name, bytes)| match serde_json::from_slice::<Rollout>(&bytes) {
            Ok(r) => Some((name, r)),
            Err(e) => {
                tracing::warn!(experiment = %name, error = %e, "saved rollout is unreadable; it starts afresh");
                None
            }
        })
        .collect()
}

/// Saves an experiment's rollout, logging (not failing) when the store refuses.
async fn save(config: &Config, experiment: &Experiment) {
    let (Some(dir), Some(rollout)) = (config.store_dir.clone(), experiment.rollout()) else {
        return;
    };
    let name = experiment.spec().name.clone();
    let bytes = serde_json::to_vec_pretty(&rollout).expect("rollouts serialize");
    let saved =
        blocking(move || Store::open(&dir).and_then(|s| s.save_record(&name, &bytes))).await;
    if let Err(e) = saved {
        tracing::error!(experiment = %experiment.spec().name, error = %e, "cannot save the rollout; a restart would resume it from its last save");
    }
}

fn log(experiment: &Experiment, decision: &Decision) {
    let evidence = serde_json::to_string(&decision.evidence).unwrap_or_default();
    tracing::warn!(
        target: "rollout",
        experiment = %experiment.spec().name,
        action = ?decision.action,
        canary_percent = experiment.rollout().map_or(0, |r| r.canary_percent()),
        %evidence,
        "rollout decision"
    );
}

/// Judges every running rollout of what serves, each at its experiment's interval, until
/// shutdown.
pub(crate) async fn run(ctx: Arc<ServeCtx>) {
    let mut last: HashMap<String, (Instant, Instant)> = HashMap::new();
    loop {
        let snapshot = ctx.shared.state.load_full();
        let tick = snapshot
            .config
            .experiments
            .iter()
            .filter_map(|e| e.rollout.as_ref().map(|r| r.evaluate_every))
            .min()
            .unwrap_or(Duration::from_secs(1))
            .min(Duration::from_secs(1));
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(tick) => {}
        }
        // Not while a reload or an upgrade holds the lock: a decision must not race a reload's
        // carry-over of the rollouts, nor be made after a new process read their state (an
        // upgrade holds the lock until this process exits). Judging resumes on a later tick.
        let Ok(_quiet) = ctx.reload_lock.try_lock() else {
            continue;
        };
        let snapshot = ctx.shared.state.load_full();
        for (experiment, spec) in snapshot
            .experiments
            .iter()
            .zip(&snapshot.config.experiments)
        {
            let Some(every) = spec.rollout.as_ref().map(|r| r.evaluate_every) else {
                continue;
            };
            if !experiment.rollout_running() {
                continue;
            }
            let now = Instant::now();
            let (evaluated, saved) = last.entry(spec.name.clone()).or_insert((now, now));
            if now.duration_since(*evaluated) < every {
                continue;
            }
            *evaluated = now;
            match experiment.evaluate(now_ms()) {
                Some(decision) => {
                    log(experiment, &decision);
                    let dir = snapshot.config.store_dir.clone();
                    let action = crate::store::audit::Action {
                        actor: "rollout".into(),
                        action: "rollout_decision".into(),
                        target: format!("experiment/{}", spec.name),
                        outcome: format!("{:?}", decision.action),
                    };
                    ctx.audit.append(dir, action).await;
                    save(&snapshot.config, experiment).await;
                    *saved = now;
                }
                None if now.duration_since(*saved) >= SAVE_EVERY => {
                    save(&snapshot.config, experiment).await;
                    *saved = now;
                }
                None => {}
            }
        }
    }
}

/// Applies an operator's command to the rollout of `name`, then records it.
pub(crate) async fn command(
    ctx: &ServeCtx,
    name: &str,
    command: Command,
) -> Result<Decision, gateway_admin::RolloutRefused> {
    // Serialised with reloads and upgrades, as uploads are: during an upgrade the command
    // waits, and is answered by the new process when the client retries.
    let _quiet = ctx.reload_lock.lock().await;
    let snapshot = ctx.shared.state.load_full();
    let experiment = snapshot
        .experiments
        .iter()
        .find(|e| e.spec().name == name)
        .ok_or_else(|| gateway_admin::RolloutRefused::NoExperiment(name.to_string()))?;
    let decision = experiment.command(command, now_ms()).map_err(|e| match e {
        CommandError::NoRollout(_) => gateway_admin::RolloutRefused::NoRollout(e.to_string()),
        CommandError::Transition(_) => gateway_admin::RolloutRefused::Conflict(e.to_string()),
    })?;
    log(experiment, &decision);
    save(&snapshot.config, experiment).await;
    Ok(decision)
}
