//! The worker's group commit on real PostgreSQL: claims and finishes of many jobs in one
//! statement answer each job as its own statement would, and statements that lock many keys'
//! and models' rows never deadlock with each other, with cancels or with admissions.

mod common;

use std::{sync::Arc, time::Duration};

use common::{leave_room_in_minute, TestEnv};
use futures::future::join_all;
use reqwest::StatusCode;
use serde_json::json;
use tollgate::{
    config::ModelConfig,
    ids::{JobId, JobStatus},
    money::MicroUsd,
    store::jobs::{self, Claim, Finish, Outcome, Spent},
};

fn completed(tokens: i32) -> Outcome {
    Outcome {
        status: JobStatus::Completed,
        spent: Spent {
            input_tokens: Some(tokens),
            output_tokens: Some(tokens),
            reasoning_tokens: None,
            usage_estimated: Some(false),
            cost: MicroUsd(1),
        },
        incomplete_reason: None,
        error: None,
    }
}

/// One claim statement for a batch: each id gets what its own claim would have answered — a new
/// job is claimed, a copy of it in the same batch finds it running, a finished job is finished,
/// an unknown id missing — and one finish statement ends only the attempts that still own their
/// jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_answers_each_job_as_alone() {
    let env = TestEnv::front_only(vec![ModelConfig::mock("mock-1")]).await;
    let key = env.key().await;
    let a = JobId::parse_public(&env.submit_ok(&key, "mock-1", "a").await).unwrap();
    let b = JobId::parse_public(&env.submit_ok(&key, "mock-1", "b").await).unwrap();
    let done = JobId::parse_public(&env.submit_ok(&key, "mock-1", "done").await).unwrap();
    let Claim::Claimed(first) = jobs::claim(&env.pool, done, 30).await.unwrap() else {
        panic!("a queued job is claimed");
    };
    assert!(jobs::finish(&env.pool, done, first.attempt, &completed(1))
        .await
        .unwrap());
    let missing = JobId::new();

    let claims = jobs::claim_many(&env.pool, &[a, b, a, done, missing], 30)
        .await
        .unwrap();
    let claims: Vec<Claim> = claims.into_iter().map(Result::unwrap).collect();
    let attempts: Vec<i32> = claims
        .iter()
        .filter_map(|c| match c {
            Claim::Claimed(c) => Some(c.attempt),
            _ => None,
        })
        .collect();
    assert_eq!(attempts, vec![1, 1], "{claims:?}");
    assert!(matches!(claims[0], Claim::Claimed(_)), "{claims:?}");
    assert!(matches!(claims[1], Claim::Claimed(_)), "{claims:?}");
    assert!(matches!(claims[2], Claim::Running), "{claims:?}");
    assert!(
        matches!(claims[3], Claim::Finished(JobStatus::Completed)),
        "{claims:?}"
    );
    assert!(matches!(claims[4], Claim::Missing), "{claims:?}");

    // `b`'s attempt 2 does not own the job: only `a` is finished.
    let outcome = completed(5);
    let finished = jobs::finish_many(
        &env.pool,
        &[
            Finish {
                id: a,
                attempt: 1,
                outcome: &outcome,
            },
            Finish {
                id: b,
                attempt: 2,
                outcome: &outcome,
            },
        ],
    )
    .await
    .unwrap();
    assert_eq!(finished, vec![true, false]);
    let statuses: Vec<(JobStatus, Option<i32>)> = sqlx::query_as(
        "SELECT status, output_tokens FROM tollgate.jobs WHERE id = ANY($1) ORDER BY id = $2 DESC",
    )
    .bind(vec![a.0, b.0])
    .bind(a.0)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        statuses,
        vec![
            (JobStatus::Completed, Some(5)),
            (JobStatus::InProgress, None)
        ]
    );
    // `done` and `a` gave back their slots; `b` holds its own.
    assert_eq!(env.counters_of(&key).await.0, 1);
}

/// Finish statements of many jobs over several keys and two limited models, each batch in its own
/// order, run at once with cancels of the same keys' other jobs and with new admissions: none
/// waits for another in a cycle (a deadlock is an error after a second), every job ends, and the
/// counters come back to exactly the jobs still queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishes_cancels_and_admissions_at_once_never_deadlock() {
    let models: Vec<ModelConfig> = ["limited-a", "limited-b"]
        .into_iter()
        .map(|name| {
            let mut model = ModelConfig::mock(name);
            model.tpm_limit = Some(100_000_000);
            model
        })
        .collect();
    let mut config = common::isolated_config(models);
    config.database.max_connections = 24;
    let env = Arc::new(TestEnv::front_with(config).await);
    let mut keys = Vec::new();
    for _ in 0..4 {
        keys.push(env.key().await);
    }
    leave_room_in_minute(30).await;
    let model = |i: usize| {
        if i.is_multiple_of(2) {
            "limited-a"
        } else {
            "limited-b"
        }
    };
    let submitted = join_all((0..160).map(|i| {
        let (env, key) = (env.clone(), keys[i % 4].clone());
        async move { env.submit_ok(&key, model(i / 4), &format!("job {i}")).await }
    }))
    .await;
    let ids: Vec<JobId> = submitted
        .iter()
        .map(|id| JobId::parse_public(id).unwrap())
        .collect();
    // The first 128 are claimed and finished in 8 batches of 16 (every key and both models in
    // each, in a different order); the other 32 are cancelled meanwhile.
    let (to_finish, to_cancel) = ids.split_at(128);
    let claims = jobs::claim_many(&env.pool, to_finish, 30).await.unwrap();
    assert!(claims
        .iter()
        .all(|c| matches!(c, Ok(Claim::Claimed(c)) if c.attempt == 1)));
    let outcome = completed(3);
    let batches = join_all((0..8).map(|b| {
        let env = env.clone();
        // Jobs 16b..16b+16: job i is of key i % 4 and model (i / 4) % 2, so each batch has
        // every key and both models; odd batches take them in the opposite order.
        let mut batch: Vec<JobId> = to_finish[16 * b..16 * (b + 1)].to_vec();
        if b % 2 == 1 {
            batch.reverse();
        }
        let outcome = &outcome;
        async move {
            let finishes: Vec<Finish> = batch
                .iter()
                .map(|id| Finish {
                    id: *id,
                    attempt: 1,
                    outcome,
                })
                .collect();
            jobs::finish_many(&env.pool, &finishes).await
        }
    }));
    let cancels = join_all(to_cancel.iter().enumerate().map(|(i, id)| {
        let (env, key) = (env.clone(), keys[i % 4].clone());
        let id = id.to_string();
        async move {
            env.http
                .post(env.url(&format!("/v1/responses/{id}/cancel")))
                .bearer_auth(&key)
                .send()
                .await
                .unwrap()
                .status()
        }
    }));
    let admissions = join_all((0..64).map(|i| {
        let (env, key) = (env.clone(), keys[(i + 1) % 4].clone());
        async move {
            env.submit(
                &key,
                json!({"model": model(i), "input": "more", "background": true}),
            )
            .await
            .0
        }
    }));
    let (finished, cancelled, admitted) = tokio::time::timeout(
        Duration::from_secs(60),
        futures::future::join3(batches, cancels, admissions),
    )
    .await
    .expect("everything answers");
    for batch in finished {
        assert!(
            batch.unwrap().iter().all(|f| *f),
            "every attempt owned its job"
        );
    }
    assert!(
        cancelled.iter().all(|s| *s == StatusCode::OK),
        "{cancelled:?}"
    );
    assert!(
        admitted.iter().all(|s| *s == StatusCode::OK),
        "{admitted:?}"
    );
    let mut in_flight = 0;
    for key in &keys {
        in_flight += env.counters_of(key).await.0;
    }
    assert_eq!(in_flight, 64, "only the new admissions hold a slot");
}
