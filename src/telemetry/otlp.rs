//! Span export over OTLP/HTTP (JSON), on when an endpoint is configured the standard way:
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` (the full URL) or `OTEL_EXPORTER_OTLP_ENDPOINT` (the
//! collector's base URL, `/v1/traces` appended); `OTEL_SDK_DISABLED=true` or
//! `OTEL_TRACES_EXPORTER=none` turn it off. `OTEL_SERVICE_NAME` names the service (`stockflow`
//! by default); `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT`, `OTEL_BSP_*` and
//! `OTEL_TRACES_SAMPLER` are read by the SDK as the specification says. On ECS the task's ADOT
//! collector sidecar listens on `localhost:4318` and forwards to AWS X-Ray.
//!
//! The spans (each with the ids a person searches by; docs/deploy.md, "Tracing"):
//! `ingest.request` (route, events, the first and last event ids, the answer's status) →
//! `stream.put` (its child: one group-commit batch, with links to the other requests it carries),
//! `shard.commit` (shard, records, the position committed, the lease epoch) and
//! `connector.request` (connector, the batch's idempotency key, items, the outcome).
//!
//! The SDK's batch processor exports from its own thread with a blocking executor; the requests
//! are sent by the connectors' HTTP client (one rustls/hyper stack in the binary) on the process'
//! tokio runtime, so the exporter needs no runtime of its own.

use std::time::Duration;

use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{Protocol, WithExportConfig as _, WithHttpConfig as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use stockflow_connectors::connector::HttpClient as Connectors;

/// The traces endpoint the environment configures, if any (the SDK resolves it the same way).
pub fn endpoint() -> Option<String> {
    endpoint_from(|name| std::env::var(name).ok())
}

fn endpoint_from(var: impl Fn(&str) -> Option<String>) -> Option<String> {
    let set = |name: &str| var(name).filter(|v| !v.trim().is_empty());
    if set("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true"))
        || set("OTEL_TRACES_EXPORTER").is_some_and(|v| v.eq_ignore_ascii_case("none"))
    {
        return None;
    }
    set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        .or_else(|| set("OTEL_EXPORTER_OTLP_ENDPOINT").map(|base| format!("{}/v1/traces", base.trim_end_matches('/'))))
}

/// The tracer provider exporting to [`endpoint`] through a batch processor, or `None` when no
/// endpoint is configured.
pub fn provider(runtime: &tokio::runtime::Handle) -> anyhow::Result<Option<SdkTracerProvider>> {
    if endpoint().is_none() {
        return Ok(None);
    }
    let client = OnRuntime { client: Connectors::new(Duration::from_secs(10)), runtime: runtime.clone() };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_protocol(Protocol::HttpJson)
        .build()?;
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name("stockflow");
    }
    let provider = SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource.build()).build();
    Ok(Some(provider))
}

/// The OTLP exporter's HTTP client: each request runs as a task on the process' runtime (the
/// batch processor's thread only waits for it).
#[derive(Debug, Clone)]
struct OnRuntime {
    client: Connectors,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnRuntime {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let task = self.runtime.spawn(async move {
            let (parts, body) = request.into_parts();
            let url = parts.uri.to_string();
            let headers: Vec<(&str, String)> = parts
                .headers
                .iter()
                .filter(|(name, _)| *name != "content-type")
                .filter_map(|(name, value)| Some((name.as_str(), value.to_str().ok()?.to_string())))
                .collect();
            let answer = client.send(parts.method, &url, &headers, body).await.map_err(|e| e.to_string())?;
            let mut response = Response::new(answer.body);
            *response.status_mut() = answer.status;
            *response.headers_mut() = answer.headers;
            Ok::<_, String>(response)
        });
        task.await.map_err(|e| HttpError::from(format!("the export task failed: {e}")))?.map_err(HttpError::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(vars: &[(&str, &str)]) -> Option<String> {
        endpoint_from(|name| vars.iter().find(|(n, _)| *n == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn the_endpoint_follows_the_otel_variables() {
        assert_eq!(with(&[]), None);
        assert_eq!(with(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]), None);
        let base = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://localhost:4318/");
        assert_eq!(with(&[base]).as_deref(), Some("http://localhost:4318/v1/traces"));
        let full = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://collector:4318/custom");
        assert_eq!(with(&[base, full]).as_deref(), Some("http://collector:4318/custom"));
        assert_eq!(with(&[base, ("OTEL_TRACES_EXPORTER", "none")]), None);
        assert_eq!(with(&[base, ("OTEL_SDK_DISABLED", "TRUE")]), None);
        assert!(with(&[base, ("OTEL_SDK_DISABLED", "false")]).is_some());
    }
}
