//! The straight pass: the state a single in-order pass over the events gives (SPEC preamble), and
//! the comparison every backend, crash and restart is checked with.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::effects::Effect;
use crate::engine::{EngineConfig, ShardEngine};
use crate::event::decode;
use crate::ledger::SkuState;

/// One line of `stockflow state dump`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkuSummary {
    /// The SKU.
    pub sku: String,
    /// Units in stock.
    pub on_hand: i64,
    /// Units reserved by open order lines.
    pub reserved: i64,
    /// `on_hand − reserved`.
    pub available: i64,
    /// Oversell alerts raised.
    pub oversells: u32,
    /// Moving average unit cost (decimal string).
    pub avg_cost: String,
    /// Cost of goods sold booked (decimal string).
    pub cogs: String,
}

impl SkuSummary {
    /// The summary of a SKU state.
    pub fn of(sku: &str, s: &SkuState) -> Self {
        SkuSummary {
            sku: sku.to_string(),
            on_hand: s.on_hand,
            reserved: s.reserved,
            available: s.available(),
            oversells: s.oversells,
            avg_cost: s.avg_cost.normalize().to_string(),
            cogs: s.cogs.to_string(),
        }
    }
}

/// What a run ends with: what `verify` compares.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Outcome {
    /// Per-SKU summaries, sorted by SKU.
    pub skus: Vec<SkuSummary>,
    /// Alerts (oversell and low stock), sorted by id.
    pub alerts: Vec<Effect>,
    /// Number of bad records.
    pub dead_letters: usize,
}

impl Outcome {
    /// Builds an outcome from stored states, effects and a dead-letter count.
    pub fn from_parts(states: &[(String, SkuState)], effects: Vec<Effect>, dead_letters: usize) -> Self {
        let mut skus: Vec<SkuSummary> = states.iter().map(|(k, s)| SkuSummary::of(k, s)).collect();
        skus.sort_by(|a, b| a.sku.cmp(&b.sku));
        let mut alerts: Vec<Effect> = effects.into_iter().filter(Effect::is_alert).collect();
        alerts.sort_by(|a, b| a.id().cmp(b.id()));
        Outcome { skus, alerts, dead_letters }
    }

    /// Oversell alerts among the alerts (the rest are low stock).
    pub fn oversell_alerts(&self) -> usize {
        self.alerts.iter().filter(|a| matches!(a, Effect::Oversell(_))).count()
    }

    /// The outcome a store holds: every SKU state, alert and dead letter.
    pub async fn of_store<S: crate::store::StateStore + crate::outbox::OutboxStore>(
        store: &S,
    ) -> Result<Self, crate::store::StoreError> {
        let states = store.sku_states().await?;
        // Page through the outbox keeping only the alerts (journals and reorders can be millions).
        let mut alerts = Vec::new();
        crate::outbox::for_each_effect(store, |_, entry| {
            if entry.effect.is_alert() {
                alerts.push(entry.effect);
            }
            Ok(())
        })
        .await?;
        let dead_letters = store.dead_letters().await?.len();
        Ok(Outcome::from_parts(&states, alerts, dead_letters))
    }

    /// Human-readable differences, at most `limit` lines (empty when equal).
    pub fn diff(&self, actual: &Outcome, limit: usize) -> Vec<String> {
        let mut out = Vec::new();
        let exp: BTreeMap<&str, &SkuSummary> = self.skus.iter().map(|s| (s.sku.as_str(), s)).collect();
        let act: BTreeMap<&str, &SkuSummary> = actual.skus.iter().map(|s| (s.sku.as_str(), s)).collect();
        for (sku, e) in &exp {
            match act.get(sku) {
                None => out.push(format!("sku {sku}: missing (expected {})", json(e))),
                Some(a) if a != e => out.push(format!("sku {sku}: expected {} got {}", json(e), json(a))),
                Some(_) => {}
            }
        }
        for sku in act.keys().filter(|k| !exp.contains_key(*k)) {
            out.push(format!("sku {sku}: unexpected"));
        }
        let ea: BTreeMap<&str, &Effect> = self.alerts.iter().map(|a| (a.id(), a)).collect();
        let aa: BTreeMap<&str, &Effect> = actual.alerts.iter().map(|a| (a.id(), a)).collect();
        if actual.alerts.len() != aa.len() {
            out.push(format!("alerts: {} stored but {} distinct ids", actual.alerts.len(), aa.len()));
        }
        for (id, e) in &ea {
            match aa.get(id) {
                None => out.push(format!("alert {id}: missing")),
                Some(a) if a != e => out.push(format!("alert {id}: expected {} got {}", json(e), json(a))),
                Some(_) => {}
            }
        }
        for id in aa.keys().filter(|k| !ea.contains_key(*k)) {
            out.push(format!("alert {id}: unexpected"));
        }
        if self.dead_letters != actual.dead_letters {
            out.push(format!("dead letters: expected {} got {}", self.dead_letters, actual.dead_letters));
        }
        out.truncate(limit);
        out
    }
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

/// Applies every record, in order, to one engine: the reference result.
pub fn straight_pass<'a>(cfg: Arc<EngineConfig>, records: impl IntoIterator<Item = &'a [u8]>) -> Outcome {
    let (engine, effects, bad) = pass(cfg, records);
    Outcome::from_parts(&engine.snapshot().skus, effects, bad)
}

/// Every effect (alerts, reorders, journal lines, discrepancies) of the straight pass, in order:
/// what the connectors must deliver, each exactly once.
pub fn straight_pass_effects<'a>(cfg: Arc<EngineConfig>, records: impl IntoIterator<Item = &'a [u8]>) -> Vec<Effect> {
    pass(cfg, records).1
}

/// The straight pass's outcome and every effect it produced, from one pass.
pub fn straight_pass_full<'a>(
    cfg: Arc<EngineConfig>,
    records: impl IntoIterator<Item = &'a [u8]>,
) -> (Outcome, Vec<Effect>) {
    let (engine, effects, bad) = pass(cfg, records);
    let alerts = effects.iter().filter(|e| e.is_alert()).cloned().collect();
    (Outcome::from_parts(&engine.snapshot().skus, alerts, bad), effects)
}

fn pass<'a>(cfg: Arc<EngineConfig>, records: impl IntoIterator<Item = &'a [u8]>) -> (ShardEngine, Vec<Effect>, usize) {
    let mut engine = ShardEngine::new(cfg);
    let mut bad = 0;
    for record in records {
        match decode(record) {
            Ok(ev) => {
                if let crate::engine::Applied::Rejected(_) = engine.apply(&ev) {
                    bad += 1;
                }
            }
            Err(_) => bad += 1,
        }
    }
    let effects = engine.take_effects();
    (engine, effects, bad)
}
