//! Liveness (`/healthz`: the process answers), readiness (`/readyz`: PostgreSQL answers and a
//! RabbitMQ connection is open) and Prometheus metrics (`/metrics`).

use axum::{extract::State, http::StatusCode, routing::get, Json, Router};
use serde_json::{json, Value};

use super::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async {
                (
                    [("content-type", "text/plain; version=0.0.4")],
                    crate::metrics::render(),
                )
            }),
        )
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let probe = sqlx::query("SELECT 1").execute(&state.pool);
    let postgres = matches!(
        tokio::time::timeout(std::time::Duration::from_secs(2), probe).await,
        Ok(Ok(_))
    );
    let rabbitmq = state.publisher.channel().await.is_ok();
    let status = if postgres && rabbitmq {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(json!({"postgres": postgres, "rabbitmq": rabbitmq})),
    )
}
