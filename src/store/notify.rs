//! Wake-ups for readers of live jobs, and revoked keys dropped from the key cache
//! (`store/key_cache.rs`). One `LISTEN tollgate_job_events, tollgate_keys` connection per process
//! (see migration `20261124000005_stream_notify.sql`) fans notifications out to the subscribers of
//! each job id. A notification carries no data: a woken subscriber re-reads the rows, so a lost
//! notification can only delay a reader, never mislead it. When the listening connection is lost
//! and re-established, every subscriber is woken, because notifications sent meanwhile are gone;
//! subscribers also wake on a slow timer as a last safety net.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use sqlx::{postgres::PgListener, PgPool};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::key_cache::{self, KeyCache};
use crate::ids::{JobId, KeyId};

/// The channel the triggers notify, with the job's UUID as payload.
pub const CHANNEL: &str = "tollgate_job_events";

/// The process's listener and its subscribers. Cheap to clone.
#[derive(Clone)]
pub struct JobWatch {
    inner: Arc<Inner>,
}

struct Inner {
    subscribers: Mutex<HashMap<Uuid, watch::Sender<u64>>>,
    fallback: Duration,
    keys: KeyCache,
    shutdown: CancellationToken,
}

impl JobWatch {
    /// Starts listening on `pool`'s database until `shutdown`. Subscribers also wake every
    /// `fallback`, whatever the listener does.
    /// Revoked keys are dropped from `keys`.
    pub fn start(
        pool: PgPool,
        database: crate::config::DatabaseConfig,
        fallback: Duration,
        keys: KeyCache,
        shutdown: CancellationToken,
    ) -> Self {
        let watch = Self {
            inner: Arc::new(Inner {
                subscribers: Mutex::new(HashMap::new()),
                fallback,
                keys,
                shutdown: shutdown.clone(),
            }),
        };
        tokio::spawn(watch.clone().listen(pool, database, shutdown));
        watch
    }

    /// Wakes the subscriber on every change of job `id` from now on. Subscribe before reading the
    /// rows, so that no change between the read and the wait goes unseen.
    pub fn subscribe(&self, id: JobId) -> Subscription {
        let mut subscribers = self.inner.subscribers.lock().expect("not poisoned");
        let rx = subscribers
            .entry(id.0)
            .or_insert_with(|| watch::channel(0).0)
            .subscribe();
        Subscription {
            rx: Some(rx),
            id: id.0,
            watch: self.clone(),
        }
    }

    fn wake(&self, id: Uuid) {
        if let Some(tx) = self
            .inner
            .subscribers
            .lock()
            .expect("not poisoned")
            .get(&id)
        {
            tx.send_modify(|n| *n += 1);
        }
    }

    fn wake_all(&self) {
        for tx in self
            .inner
            .subscribers
            .lock()
            .expect("not poisoned")
            .values()
        {
            tx.send_modify(|n| *n += 1);
        }
    }

    async fn listen(
        self,
        pool: PgPool,
        database: crate::config::DatabaseConfig,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let mut listener = match connect(&pool, &database).await {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "cannot LISTEN for job changes; readers fall back to polling");
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            // Anything may have changed while no connection was listening.
            self.wake_all();
            self.inner.keys.clear();
            loop {
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = listener.try_recv() => received,
                };
                match received {
                    // One id, or (written output) several separated by commas.
                    Ok(Some(notification)) => {
                        for id in notification.payload().split(',') {
                            match Uuid::try_parse(id) {
                                Ok(id) if notification.channel() == key_cache::CHANNEL => {
                                    self.inner.keys.forget(KeyId(id))
                                }
                                Ok(id) => self.wake(id),
                                Err(_) => tracing::warn!(
                                    payload = notification.payload(),
                                    "unexpected notification payload"
                                ),
                            }
                        }
                    }
                    // The connection was lost and re-established: notifications may be missing.
                    Ok(None) => {
                        self.wake_all();
                        self.inner.keys.clear();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "lost the LISTEN connection; reconnecting");
                        self.wake_all();
                        self.inner.keys.clear();
                        break;
                    }
                }
            }
        }
    }
}

async fn connect(
    pool: &PgPool,
    database: &crate::config::DatabaseConfig,
) -> Result<PgListener, sqlx::Error> {
    let mut listener = super::listener(pool, database).await?;
    listener.listen_all([CHANNEL, key_cache::CHANNEL]).await?;
    Ok(listener)
}

/// Wake-ups for one job. Dropping it unsubscribes.
pub struct Subscription {
    rx: Option<watch::Receiver<u64>>,
    id: Uuid,
    watch: JobWatch,
}

impl Subscription {
    /// Waits until the job may have changed: a notification, or the fallback timer. False when
    /// the process is shutting down: readers should end, so the front can drain.
    pub async fn changed(&mut self) -> bool {
        let inner = &self.watch.inner;
        let rx = self.rx.as_mut().expect("present until dropped");
        tokio::select! {
            _ = inner.shutdown.cancelled() => return false,
            // The sender lives as long as any subscriber, so this cannot fail while we hold `rx`.
            _ = rx.changed() => {}
            _ = tokio::time::sleep(inner.fallback) => {}
        }
        !inner.shutdown.is_cancelled()
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut subscribers = self.watch.inner.subscribers.lock().expect("not poisoned");
        drop(self.rx.take());
        if subscribers
            .get(&self.id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            subscribers.remove(&self.id);
        }
    }
}
