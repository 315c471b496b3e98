//! Spans over OTLP: `stockflow run` with `OTEL_EXPORTER_OTLP_ENDPOINT` set exports, to a local
//! OTLP/HTTP (JSON) receiver, one `ingest.request` span per request (with its event ids and
//! status), `stream.put` spans whose parent (or links) name every request whose events they
//! carried, `shard.commit` spans covering every event exactly once, and `connector.request` spans
//! with the idempotency keys and effect ids the connector receivers accepted.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::routing::post;
use serde_json::Value;
use stockflow_connectors::testing::{FaultPlan, Receivers};
use support::{Run, http, placed, received, wait_for};

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    trace: String,
    id: String,
    parent: String,
    links: Vec<(String, String)>,
    attrs: BTreeMap<String, Value>,
    service: String,
}

impl Span {
    fn str(&self, key: &str) -> Option<&str> {
        self.attrs.get(key)?.as_str()
    }

    /// An integer attribute (OTLP/JSON writes 64-bit integers as strings).
    fn int(&self, key: &str) -> Option<i64> {
        match self.attrs.get(key)? {
            Value::String(s) => s.parse().ok(),
            v => v.as_i64(),
        }
    }
}

/// The spans of an OTLP `ExportTraceServiceRequest` in JSON.
fn spans_of(body: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in body["resourceSpans"].as_array().into_iter().flatten() {
        let service = rs["resource"]["attributes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["key"] == "service.name")
            .and_then(|a| a["value"]["stringValue"].as_str())
            .unwrap_or_default()
            .to_string();
        for ss in rs["scopeSpans"].as_array().into_iter().flatten() {
            for s in ss["spans"].as_array().into_iter().flatten() {
                let attrs = s["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|a| {
                        let v = &a["value"];
                        let v = ["stringValue", "intValue", "boolValue", "doubleValue"]
                            .iter()
                            .find_map(|k| v.get(*k))
                            .cloned()
                            .unwrap_or(Value::Null);
                        (a["key"].as_str().unwrap().to_string(), v)
                    })
                    .collect();
                let text = |k: &str| s[k].as_str().unwrap_or_default().to_string();
                out.push(Span {
                    name: text("name"),
                    trace: text("traceId"),
                    id: text("spanId"),
                    parent: text("parentSpanId"),
                    links: s["links"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|l| {
                            (l["traceId"].as_str().unwrap().to_string(), l["spanId"].as_str().unwrap().to_string())
                        })
                        .collect(),
                    attrs,
                    service: service.clone(),
                });
            }
        }
    }
    out
}

/// A local OTLP/HTTP receiver: every `POST /v1/traces` body, parsed.
fn start_receiver(rt: &tokio::runtime::Runtime) -> (String, Arc<Mutex<Vec<Span>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = Arc::clone(&spans);
    let app = axum::Router::new().route(
        "/v1/traces",
        post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let store = Arc::clone(&store);
            async move {
                assert_eq!(headers["content-type"], "application/json");
                let doc: Value = serde_json::from_slice(&body).expect("OTLP/JSON");
                store.lock().unwrap().extend(spans_of(&doc));
                "{}"
            }
        }),
    );
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), spans)
}

#[test]
fn requests_puts_commits_and_connector_calls_are_exported_as_linked_spans() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let (collector, spans) = start_receiver(&rt);
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let receivers = Receivers::new(FaultPlan::none(), Some(b"otlp-test-key-32-bytes-long-abcd".to_vec()));
    let (base, _) = rt.block_on(receivers.start(stop_rx)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "shards = 2\n[worker]\ncommit_interval_ms = 20\n{}",
        support::connectors_config(&base, "generic", b"otlp-test-key-32-bytes-long-abcd", 50)
    );
    let mut run = Run::start_with_env(
        dir.path(),
        &config,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &collector),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            ("OTEL_SERVICE_NAME", "sf-test"),
        ],
    );

    // Eight requests of three events each, and one refused (a bad quantity).
    let mut events = 0;
    for r in 0..8 {
        let batch = [
            received(&format!("r{r}"), &format!("SKU-{}", r % 3), 5),
            placed(&format!("p{r}a"), &format!("SKU-{}", r % 3), 1, &format!("o{r}")),
            placed(&format!("p{r}b"), &format!("SKU-{}", r % 3), 9, &format!("o{r}b")),
        ];
        support::post_events(&run.ingest, &batch);
        events += batch.len() as i64;
    }
    let (status, _) = http(&run.ingest, "POST", "/v1/events", &received("bad", "SKU-0", -3));
    assert_eq!(status, 400);

    // Every event committed and the connectors' deliveries exported.
    wait_for("spans of every commit and a delivered connector request", Duration::from_secs(60), || {
        let s = spans.lock().unwrap();
        let committed: i64 = s.iter().filter(|x| x.name == "shard.commit").filter_map(|x| x.int("records")).sum();
        let delivered = s
            .iter()
            .filter(|x| x.name == "connector.request" && x.str("outcome") == Some("delivered"))
            .filter_map(|x| x.str("connector"))
            .collect::<BTreeSet<_>>();
        (committed >= events && delivered.contains("accounting") && delivered.contains("alerts-webhook")).then_some(())
    });
    assert!(run.stop(), "stockflow run exits cleanly");
    let s = spans.lock().unwrap().clone();
    assert!(s.iter().all(|x| x.service == "sf-test"), "OTEL_SERVICE_NAME names the service");

    // One ingest.request per request, with its route, status and event ids.
    let requests: Vec<&Span> = s.iter().filter(|x| x.name == "ingest.request").collect();
    assert_eq!(requests.len(), 9, "{requests:#?}");
    let ok: Vec<&&Span> = requests.iter().filter(|x| x.int("status") == Some(202)).collect();
    assert_eq!(ok.len(), 8);
    assert!(ok.iter().all(|x| x.str("route") == Some("events") && x.int("events") == Some(3)));
    let firsts: BTreeSet<&str> = ok.iter().filter_map(|x| x.str("first_event_id")).collect();
    let lasts: BTreeSet<&str> = ok.iter().filter_map(|x| x.str("last_event_id")).collect();
    assert_eq!(firsts, (0..8).map(|r| format!("r{r}")).collect::<BTreeSet<_>>().iter().map(String::as_str).collect());
    assert_eq!(lasts, (0..8).map(|r| format!("p{r}b")).collect::<BTreeSet<_>>().iter().map(String::as_str).collect());
    let refused = requests.iter().find(|x| x.int("status") == Some(400)).expect("the refused request's span");

    // Every accepted request is named by exactly one stream.put (its parent or a link), in the
    // same trace when it is the parent; the refused request by none.
    let puts: Vec<&Span> = s.iter().filter(|x| x.name == "stream.put").collect();
    let mut carried: BTreeMap<(String, String), usize> = BTreeMap::new();
    for p in &puts {
        let parent = requests.iter().find(|r| r.id == p.parent).expect("a put's parent is an ingest request");
        assert_eq!(parent.trace, p.trace, "a put is in its first request's trace");
        *carried.entry((p.trace.clone(), p.parent.clone())).or_default() += 1;
        for link in &p.links {
            *carried.entry(link.clone()).or_default() += 1;
        }
        assert_eq!(p.int("requests"), Some(1 + p.links.len() as i64));
        assert_eq!(p.int("records"), Some(3 * (1 + p.links.len() as i64)));
        assert_eq!(p.str("outcome"), Some("ok"));
    }
    let want: BTreeMap<(String, String), usize> = ok.iter().map(|r| ((r.trace.clone(), r.id.clone()), 1)).collect();
    assert_eq!(carried, want, "each accepted request put once");
    assert!(!carried.contains_key(&(refused.trace.clone(), refused.id.clone())));

    // The commits cover every event once, each on a shard, at a position, under a lease epoch.
    let commits: Vec<&Span> = s.iter().filter(|x| x.name == "shard.commit").collect();
    assert_eq!(commits.iter().filter_map(|x| x.int("records")).sum::<i64>(), events);
    for c in &commits {
        assert!(c.str("shard").is_some_and(|v| !v.is_empty()) && c.str("checkpoint").is_some(), "{c:?}");
        assert!(c.int("epoch").is_some() && c.str("outcome") == Some("ok"), "{c:?}");
    }

    // Connector requests carry the keys and effect ids the receivers accepted.
    let log = receivers.log();
    let delivered: Vec<&Span> =
        s.iter().filter(|x| x.name == "connector.request" && x.str("outcome") == Some("delivered")).collect();
    assert!(!delivered.is_empty());
    for d in &delivered {
        assert!(d.str("idempotency_key").is_some_and(|k| !k.is_empty()), "{d:?}");
        let first = d.str("first_item").expect("first_item");
        assert!(log.items.contains_key(first), "{first} was delivered but not accepted");
        assert!(d.int("items").is_some_and(|n| n >= 1));
    }
}
