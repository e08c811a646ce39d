//! Placeholder, replaced by the real provider.

use super::{CallRequest, ChunkStream, ProviderError};
use crate::config::ModelConfig;

pub async fn stream(
    _client: &reqwest::Client,
    _model: &ModelConfig,
    _request: &CallRequest,
) -> Result<ChunkStream, ProviderError> {
    Err(ProviderError::Config("not built yet".into()))
}
