//! Keys: prefixes that name one key, and a revoke that never takes more than the one it names.

mod common;

use common::TestEnv;
use tollgate::{
    config::ModelConfig,
    store::keys::{self, NewKey, Revoked, PREFIX_LEN},
};

fn named(name: &str) -> NewKey {
    NewKey {
        name: name.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_are_eight_hex_digits_and_unique() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let secret = env.create_key(named("a")).await;
    let prefix: String = sqlx::query_scalar("SELECT key_prefix FROM tollgate.api_keys")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(prefix.len(), PREFIX_LEN);
    assert_eq!(prefix, secret[..PREFIX_LEN]);
    assert!(prefix["sk-tg-".len()..]
        .chars()
        .all(|c| c.is_ascii_hexdigit()));
    // A second key with the same prefix is refused by the index.
    let clash = sqlx::query(
        "INSERT INTO tollgate.api_keys (id, name, key_hash, key_prefix)
         VALUES (gen_random_uuid(), 'clash', '\\x00', $1)",
    )
    .bind(&prefix)
    .execute(&env.pool)
    .await;
    let error = clash.expect_err("a duplicate prefix was stored");
    assert_eq!(
        error.as_database_error().and_then(|e| e.constraint()),
        Some("api_keys_prefix"),
        "{error}"
    );
    // Revoking by the printed prefix names the key it revoked.
    let (id,): (uuid::Uuid,) = sqlx::query_as("SELECT id FROM tollgate.api_keys")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(
        keys::revoke(&env.pool, &prefix).await.unwrap(),
        Revoked::One(tollgate::ids::KeyId(id), "a".into())
    );
    assert_eq!(
        keys::revoke(&env.pool, &prefix).await.unwrap(),
        Revoked::None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambiguous_prefix_revokes_nothing_and_an_id_revokes_one() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let first = env.create_key(named("first")).await;
    let second = env.create_key(named("second")).await;
    // Two keys of the old 4-digit kind that share a prefix.
    sqlx::query("UPDATE tollgate.api_keys SET key_prefix = 'sk-tg-573a'")
        .execute(&env.pool)
        .await
        .unwrap();
    let Revoked::Ambiguous(found) = keys::revoke(&env.pool, "sk-tg-573a").await.unwrap() else {
        panic!("an ambiguous prefix revoked a key");
    };
    assert_eq!(found.len(), 2);
    assert!(keys::find_live(&env.pool, &first).await.unwrap().is_some());
    assert!(keys::find_live(&env.pool, &second).await.unwrap().is_some());
    let (id, name) = found.into_iter().find(|(_, n)| n == "second").unwrap();
    assert_eq!(
        keys::revoke(&env.pool, &id.to_string()).await.unwrap(),
        Revoked::One(id, name)
    );
    assert!(keys::find_live(&env.pool, &second).await.unwrap().is_none());
    assert!(keys::find_live(&env.pool, &first).await.unwrap().is_some());
}

/// The front caches keys it looked up (`server.key_cache_ms`, 10 s by default), yet a key changed
/// by hand is seen as soon as the change's notification arrives, a key revoked while cached is
/// never admitted once `revoke` has returned, and the front stops serving it as soon as the
/// revoke's notification arrives, long before the cache would have let it go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_key_is_refused_once_revoked() {
    let mut config = common::isolated_config(vec![ModelConfig::mock("mock-1")]);
    config.server.key_cache_ms = 600_000;
    let env = TestEnv::front_with(config).await;
    let secret = env.create_key(named("cached")).await;
    let id = env.submit_ok(&secret, "mock-1", "cache me").await;
    assert_eq!(env.get(&secret, &id).await.0, 200);
    let key_id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM tollgate.api_keys")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    // An operator's own UPDATE of the key is seen at once too.
    let body = serde_json::json!({"model": "mock-1", "input": "allowed?", "background": true});
    sqlx::query("UPDATE tollgate.api_keys SET allowed_models = ARRAY['another-model']")
        .execute(&env.pool)
        .await
        .unwrap();
    env.wait_for(std::time::Duration::from_secs(5), || async {
        env.submit(&secret, body.clone()).await.0 == 403
    })
    .await;
    sqlx::query("UPDATE tollgate.api_keys SET allowed_models = NULL")
        .execute(&env.pool)
        .await
        .unwrap();
    env.wait_for(std::time::Duration::from_secs(5), || async {
        env.submit(&secret, body.clone()).await.0 == 200
    })
    .await;
    let revoked = keys::revoke(&env.pool, &key_id.to_string()).await.unwrap();
    assert!(matches!(revoked, Revoked::One(..)), "{revoked:?}");
    // Admission checks the key under its lock: refused at once, nothing written.
    let before = env.snapshot().await;
    let (status, body) = env
        .submit(
            &secret,
            serde_json::json!({"model": "mock-1", "input": "after revoke", "background": true}),
        )
        .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(env.snapshot().await.jobs, before.jobs);
    // Reads stop as soon as the notification has dropped the cached key.
    env.wait_for(std::time::Duration::from_secs(5), || async {
        env.get(&secret, &id).await.0 == 401
    })
    .await;
}
