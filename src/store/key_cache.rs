//! Key look-ups cached in the front. Every request presents a key; looking it up in PostgreSQL
//! each time is a round trip per request. A key found live is kept here for
//! `server.key_cache_ms`, and dropped at once when it changes: a trigger on `tollgate.api_keys`
//! notifies [`CHANNEL`] on every update or delete of a key (a revoke, or an operator's own SQL),
//! and the process's listener (`store/notify.rs`) forgets the key on the notification, or forgets
//! every key when its connection was lost (notifications sent meanwhile are gone).
//!
//! A cached key is never what admits a request: `tollgate.admit` locks the key's counters only if
//! the key is live at that moment, so a key revoked before `keys revoke` returned is refused
//! whatever this cache holds. What the cache can serve for a few milliseconds after a revoke
//! (until the notification arrives) is a read of the key's own responses. Unknown secrets are
//! never cached, so guessing keys cannot fill it; it holds at most [`CAPACITY`] keys.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::keys::{self, ApiKey};
use crate::ids::KeyId;

/// The channel `keys revoke` notifies, with the key's id as payload.
pub const CHANNEL: &str = "tollgate_keys";

/// Keys cached at most; past it the cache starts again empty.
pub const CAPACITY: usize = 100_000;

/// The process's cache. Cheap to clone.
#[derive(Clone)]
pub struct KeyCache {
    ttl: Duration,
    entries: Arc<Mutex<HashMap<Vec<u8>, Entry>>>,
}

struct Entry {
    key: ApiKey,
    expires_at: Option<DateTime<Utc>>,
    fetched: Instant,
}

impl KeyCache {
    /// A cache keeping keys for `ttl` (zero: no caching).
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            entries: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The live key with this secret, from the cache when it was looked up less than the TTL
    /// ago (and has not expired since), else from PostgreSQL.
    pub async fn find_live(
        &self,
        pool: &PgPool,
        secret: &str,
    ) -> Result<Option<ApiKey>, sqlx::Error> {
        let hash = keys::hash_secret(secret);
        if let Some(entry) = self.entries.lock().expect("not poisoned").get(&hash) {
            let fresh = entry.fetched.elapsed() < self.ttl;
            if fresh && entry.expires_at.is_none_or(|at| at > Utc::now()) {
                return Ok(Some(entry.key.clone()));
            }
        }
        let found = keys::find_live_by_hash(pool, &hash).await?;
        if let Some((key, expires_at)) = &found {
            if !self.ttl.is_zero() {
                let mut entries = self.entries.lock().expect("not poisoned");
                if entries.len() >= CAPACITY {
                    entries.clear();
                }
                entries.insert(
                    hash,
                    Entry {
                        key: key.clone(),
                        expires_at: *expires_at,
                        fetched: Instant::now(),
                    },
                );
            }
        }
        Ok(found.map(|(key, _)| key))
    }

    /// Forgets the key (it was revoked or changed).
    pub fn forget(&self, id: KeyId) {
        self.entries
            .lock()
            .expect("not poisoned")
            .retain(|_, entry| entry.key.id != id);
    }

    /// Forgets every key.
    pub fn clear(&self) {
        self.entries.lock().expect("not poisoned").clear();
    }
}
