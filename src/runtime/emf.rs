//! A consumer-group member's figures for CloudWatch, as Embedded Metric Format lines on stdout.
//!
//! On ECS the awslogs driver ships stdout to CloudWatch Logs, which turns each line into metric
//! data points: no `PutMetricData` calls, no extra permission, no agent. The alarms and the lag
//! autoscaling of `deploy/cloudformation` read these metrics (dimension `ConsumerGroup` = the
//! stream's name): Kinesis' own `GetRecords.IteratorAgeMilliseconds` covers only polling
//! consumers, so in enhanced fan-out mode the lag must come from the members.

use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::watch;

use crate::runtime::config::CloudwatchSection;
use crate::telemetry::{Sample, parse_exposition};

/// The largest time behind the stream's newest record over this member's shards (Maximum).
pub const LAG: &str = "ConsumerLagMilliseconds";
/// Oversell alerts committed since the previous line (Sum).
pub const OVERSELL: &str = "OversellAlerts";
/// Connector requests dead-lettered since the previous line (Sum).
pub const DEAD_LETTERS: &str = "ConnectorDeadLetters";
/// Records committed since the previous line (Sum).
pub const COMMITTED: &str = "RecordsCommitted";
/// Every metric a line can carry (the deploy test checks each alarm on this namespace names one).
pub const METRICS: [&str; 4] = [LAG, OVERSELL, DEAD_LETTERS, COMMITTED];
/// The one dimension: the consumer group, named by its stream.
pub const DIMENSION: &str = "ConsumerGroup";

/// One EMF line: the increase of the counters from `before` to `now` (a counter that went down —
/// cannot happen in one process — counts from zero), the lag when this member holds shards.
pub fn line(namespace: &str, group: &str, worker: &str, at_ms: u64, before: &Sample, now: &Sample) -> String {
    let inc = |f: fn(&Sample) -> u64| {
        let (a, b) = (f(now), f(before));
        if a >= b { a - b } else { a }
    };
    let mut metrics = vec![
        json!({"Name": OVERSELL, "Unit": "Count"}),
        json!({"Name": DEAD_LETTERS, "Unit": "Count"}),
        json!({"Name": COMMITTED, "Unit": "Count"}),
    ];
    let mut doc = json!({
        DIMENSION: group,
        "worker": worker,
        OVERSELL: inc(|s| s.oversell_alerts),
        DEAD_LETTERS: inc(|s| s.connector_dead_letters),
        COMMITTED: inc(|s| s.committed),
    });
    if let Some(lag) = now.lag_seconds {
        metrics.push(json!({"Name": LAG, "Unit": "Milliseconds"}));
        doc[LAG] = json!((lag * 1000.0).round());
    }
    doc["_aws"] = json!({
        "Timestamp": at_ms,
        "CloudWatchMetrics": [{"Namespace": namespace, "Dimensions": [[DIMENSION]], "Metrics": metrics}],
    });
    doc.to_string()
}

/// Prints a line every `cfg.emf_interval_s` until `stop` turns true, then a last one (the figures
/// of the final commits). `None` when the lines are off (`emf_interval_s = 0`) or metrics are not recorded.
pub fn spawn(
    cfg: &CloudwatchSection,
    handle: Option<PrometheusHandle>,
    group: String,
    worker: String,
    mut stop: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let handle = handle.filter(|_| cfg.emf_interval_s > 0)?;
    let (namespace, every) = (cfg.namespace.clone(), Duration::from_secs(cfg.emf_interval_s));
    Some(tokio::spawn(async move {
        let mut before = Sample::default();
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            let last = tokio::select! {
                _ = ticks.tick() => false,
                _ = stop.wait_for(|s| *s) => true,
            };
            let now = parse_exposition(&handle.render());
            let at_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            println!("{}", line(&namespace, &group, &worker, at_ms, &before, &now));
            before = now;
            if last {
                return;
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_embedded_metric_format_with_increases() {
        let before = Sample { oversell_alerts: 3, connector_dead_letters: 1, committed: 100, ..Sample::default() };
        let now = Sample {
            oversell_alerts: 5,
            connector_dead_letters: 1,
            committed: 160,
            lag_seconds: Some(1.25),
            ..Sample::default()
        };
        let v: serde_json::Value =
            serde_json::from_str(&line("stockflow", "s-events", "w1", 42, &before, &now)).unwrap();
        assert_eq!(v["_aws"]["Timestamp"], 42);
        let directive = &v["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "stockflow");
        assert_eq!(directive["Dimensions"], json!([["ConsumerGroup"]]));
        // Every declared metric has its value at the top level, as EMF requires.
        for m in directive["Metrics"].as_array().unwrap() {
            let name = m["Name"].as_str().unwrap();
            assert!(METRICS.contains(&name), "{name}");
            assert!(v[name].is_number(), "{name} has no value");
        }
        assert_eq!(
            (v[OVERSELL].as_u64(), v[DEAD_LETTERS].as_u64(), v[COMMITTED].as_u64()),
            (Some(2), Some(0), Some(60))
        );
        assert_eq!(v[LAG].as_f64(), Some(1250.0));
        assert_eq!(v[DIMENSION], "s-events");
        // No shards held: no lag figure (a 0 would hide a stalled group behind an idle member).
        let idle: serde_json::Value = serde_json::from_str(&line(
            "stockflow",
            "s",
            "w",
            1,
            &now,
            &Sample { committed: 160, ..Sample::default() },
        ))
        .unwrap();
        assert!(idle.get(LAG).is_none());
        assert_eq!(idle["_aws"]["CloudWatchMetrics"][0]["Metrics"].as_array().unwrap().len(), 3);
    }

    #[test]
    fn counters_come_from_the_exposition() {
        let text = "stockflow_alerts_total{kind=\"oversell\"} 7\nstockflow_alerts_total{kind=\"low_stock\"} 4\n\
                    stockflow_connector_dead_lettered_total{connector=\"a\"} 2\n\
                    stockflow_connector_dead_lettered_total{connector=\"b\"} 1\n";
        let s = parse_exposition(text);
        assert_eq!((s.oversell_alerts, s.connector_dead_letters), (7, 3));
    }
}
