//! Turns of one key's admissions in this front. Every admission of a key waits for the key's
//! counter row lock in PostgreSQL, one after another; an admission waiting there holds a pooled
//! connection all the while. Without a bound, a burst on one busy key would hold every pooled
//! connection and starve every other key. So at most `server.admissions_per_key` admissions of a
//! key are in PostgreSQL at once from one front; the rest of that key's requests wait here, in
//! memory, holding no connection. (Exactness does not depend on this: the row lock does.)

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ids::KeyId;

pub struct KeyTurns {
    per_key: usize,
    keys: Arc<Mutex<HashMap<KeyId, Arc<Semaphore>>>>,
}

/// A key's turn; the next waiting admission of the key goes on when it is dropped.
pub struct Turn {
    key: KeyId,
    semaphore: Arc<Semaphore>,
    permit: Option<OwnedSemaphorePermit>,
    keys: Arc<Mutex<HashMap<KeyId, Arc<Semaphore>>>>,
}

impl KeyTurns {
    pub fn new(per_key: usize) -> Self {
        Self {
            per_key: per_key.max(1),
            keys: Arc::default(),
        }
    }

    /// Waits for a turn of `key`.
    pub async fn take(&self, key: KeyId) -> Turn {
        let semaphore = self
            .keys
            .lock()
            .expect("not poisoned")
            .entry(key)
            .or_insert_with(|| Arc::new(Semaphore::new(self.per_key)))
            .clone();
        let permit = semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        Turn {
            key,
            semaphore,
            permit: Some(permit),
            keys: self.keys.clone(),
        }
    }

    /// Keys with an admission in progress or waiting.
    #[cfg(test)]
    fn keys_tracked(&self) -> usize {
        self.keys.lock().expect("not poisoned").len()
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        let mut keys = self.keys.lock().expect("not poisoned");
        drop(self.permit.take());
        // Only the map and this turn hold the semaphore: no one else has or waits for a turn
        // of this key (a newcomer clones it under this same lock).
        if Arc::strong_count(&self.semaphore) == 2 {
            keys.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_key_has_at_most_its_turns_and_is_forgotten_when_idle() {
        let turns = KeyTurns::new(2);
        let (a, b) = (KeyId(uuid::Uuid::now_v7()), KeyId(uuid::Uuid::now_v7()));
        let first = turns.take(a).await;
        let second = turns.take(a).await;
        // A third turn of `a` waits; another key does not.
        let third = tokio::time::timeout(std::time::Duration::from_millis(50), turns.take(a));
        assert!(third.await.is_err());
        let other = turns.take(b).await;
        assert_eq!(turns.keys_tracked(), 2);
        drop(first);
        let third = turns.take(a).await;
        drop((second, third, other));
        assert_eq!(turns.keys_tracked(), 0);
    }
}
