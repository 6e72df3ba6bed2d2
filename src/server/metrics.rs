//! `/metrics` (with `--metrics`): llama-server's Prometheus counters and gauges,
//! plus latent-tap's.

use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;

pub(crate) async fn metrics(State(app): AppState) -> Response {
    if !app.cfg.metrics {
        return ApiError::unsupported(
            "This server does not support metrics endpoint. Start it with `--metrics`",
        )
        .into_response();
    }
    let engine = match app.engine() {
        Ok(e) => e,
        Err(e) => return e.into_response(),
    };
    let st = engine.stats();
    let ld = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed) as f64;
    let prompt_s = ld(&st.prompt_us) / 1e6;
    let gen_s = ld(&st.gen_us) / 1e6;
    let rate = |n: f64, s: f64| if s > 0.0 { n / s } else { 0.0 };
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}\n"
        ));
    };
    metric(
        "llamacpp:prompt_tokens_total",
        "counter",
        "Number of prompt tokens processed, excluding cached tokens.",
        ld(&st.prompt_tokens),
    );
    metric(
        "llamacpp:prompt_seconds_total",
        "counter",
        "Total time spent processing prompts.",
        prompt_s,
    );
    metric(
        "llamacpp:tokens_predicted_total",
        "counter",
        "Number of generation tokens processed.",
        ld(&st.generated_tokens),
    );
    metric(
        "llamacpp:tokens_predicted_seconds_total",
        "counter",
        "Total time spent generating tokens.",
        gen_s,
    );
    metric(
        "llamacpp:n_decode_total",
        "counter",
        "Total number of llama_decode() calls.",
        ld(&st.decodes),
    );
    metric(
        "llamacpp:prompt_tokens_seconds",
        "gauge",
        "Average prompt throughput in tokens/s.",
        rate(ld(&st.prompt_tokens), prompt_s),
    );
    metric(
        "llamacpp:predicted_tokens_seconds",
        "gauge",
        "Average generation throughput in tokens/s.",
        rate(ld(&st.generated_tokens), gen_s),
    );
    metric(
        "llamacpp:requests_processing",
        "gauge",
        "Number of requests processing.",
        st.active.load(Ordering::Relaxed) as f64,
    );
    metric(
        "llamacpp:requests_deferred",
        "gauge",
        "Number of requests deferred.",
        st.queued.load(Ordering::Relaxed) as f64,
    );
    metric(
        "llamacpp:kv_cache_tokens",
        "gauge",
        "KV cache tokens in use.",
        ld(&st.kv_tokens),
    );
    metric(
        "latent_tap:frames_total",
        "counter",
        "Latent frames produced by the tap.",
        ld(&st.frames),
    );
    metric(
        "latent_tap:frame_bytes_out_total",
        "counter",
        "Latent payload bytes delivered to requesters and subscribers.",
        ld(&st.frame_bytes_out),
    );
    metric(
        "latent_tap:tap_drops_total",
        "counter",
        "Frames the tap dropped because its ring was full.",
        ld(&st.tap_drops),
    );
    metric(
        "latent_tap:queue_depth",
        "gauge",
        "Requests waiting for a slot.",
        st.queued.load(Ordering::Relaxed) as f64,
    );
    let subs = engine.subscribers();
    metric(
        "latent_tap:subscribers",
        "gauge",
        "Connected latent subscribers.",
        subs.len() as f64,
    );
    out.push_str("# HELP latent_tap:subscriber_drops_total Frames dropped for a subscriber whose queue was full.\n# TYPE latent_tap:subscriber_drops_total counter\n");
    for s in &subs {
        out.push_str(&format!(
            "latent_tap:subscriber_drops_total{{subscriber=\"{}\"}} {}\n",
            s.id,
            s.drops.load(Ordering::Relaxed)
        ));
    }
    let mut r = (StatusCode::OK, out).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    r
}
