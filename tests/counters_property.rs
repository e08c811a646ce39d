//! A property test on real PostgreSQL: random sequences of submit / finish / fail / cancel /
//! duplicate finish / expire, driven through the library's admission and job transitions, keep the
//! counters' invariants after every step:
//! - `in_flight` = jobs queued or in progress, never above the limit;
//! - `reserved` = the reservations of those jobs;
//! - `spent` = what finished jobs were charged, and `spent + reserved` never passes the budget;
//! - the rate window counts exactly the admitted jobs.

mod common;

use std::sync::Arc;

use common::TestEnv;
use proptest::{prelude::*, test_runner::TestRunner};
use serde_json::json;
use tollgate::{
    admission::{Admission, Admitted, Submission},
    config::ModelConfig,
    ids::{JobId, JobStatus, KeyId},
    money::MicroUsd,
    request::CreateResponse,
    store::{
        jobs::{self, Claim, Claimed, Outcome, Spent},
        keys::{self, NewKey},
    },
};

#[derive(Debug, Clone)]
enum Op {
    Submit { max_output: u32 },
    Finish { job: usize, input: u32, output: u32 },
    Fail { job: usize },
    Cancel { job: usize },
    FinishTwice { job: usize },
    ExpireAll,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u32..2000).prop_map(|max_output| Op::Submit { max_output }),
        3 => (0usize..64, 0u32..3000, 0u32..3000)
            .prop_map(|(job, input, output)| Op::Finish { job, input, output }),
        1 => (0usize..64).prop_map(|job| Op::Fail { job }),
        1 => (0usize..64).prop_map(|job| Op::Cancel { job }),
        1 => (0usize..64).prop_map(|job| Op::FinishTwice { job }),
        1 => Just(Op::ExpireAll),
    ]
}

struct Run<'a> {
    env: &'a TestEnv,
    admission: &'a Admission,
    secret: String,
    key_id: KeyId,
    budget: i64,
    jobs: Vec<JobId>,
}

impl Run<'_> {
    async fn apply(&mut self, op: &Op) {
        let pool = &self.env.pool;
        let pick = |i: usize| (!self.jobs.is_empty()).then(|| self.jobs[i % self.jobs.len()]);
        match *op {
            Op::Submit { max_output } => {
                let body = json!({"model": "mock-1", "input": "property", "background": true,
                                  "max_output_tokens": max_output});
                let decision = self
                    .admission
                    .admit(Submission {
                        secret: &self.secret,
                        body: CreateResponse::parse(body.to_string().as_bytes()),
                        idempotency_key: None,
                    })
                    .await;
                if let Ok(Admitted::New { job, .. }) = decision.result {
                    self.jobs.push(job.id);
                }
            }
            Op::Finish { job, .. } | Op::FinishTwice { job } if pick(job).is_some() => {
                let id = pick(job).unwrap();
                let (input, output) = match *op {
                    Op::Finish { input, output, .. } => (input, output),
                    _ => (10, 10),
                };
                if let Claim::Claimed(Claimed { attempt, .. }) =
                    jobs::claim(pool, id, 30).await.unwrap()
                {
                    let model = self.env.config.model("mock-1").unwrap();
                    let outcome = Outcome {
                        status: JobStatus::Completed,
                        spent: Spent {
                            input_tokens: Some(input as i32),
                            output_tokens: Some(output as i32),
                            usage_estimated: Some(false),
                            cost: model.cost(input as u64, output as u64),
                            reasoning_tokens: None,
                        },
                        incomplete_reason: None,
                        error: None,
                    };
                    assert!(jobs::finish(pool, id, attempt, &outcome).await.unwrap());
                    if matches!(op, Op::FinishTwice { .. }) {
                        assert!(!jobs::finish(pool, id, attempt, &outcome).await.unwrap());
                    }
                }
            }
            Op::Fail { job } if pick(job).is_some() => {
                let id = pick(job).unwrap();
                if let Claim::Claimed(Claimed { attempt, .. }) =
                    jobs::claim(pool, id, 30).await.unwrap()
                {
                    let outcome = Outcome {
                        status: JobStatus::Failed,
                        spent: Spent::default(),
                        incomplete_reason: None,
                        error: Some(json!({"code": "test"})),
                    };
                    assert!(jobs::finish(pool, id, attempt, &outcome).await.unwrap());
                }
            }
            Op::Cancel { job } if pick(job).is_some() => {
                jobs::cancel(pool, pick(job).unwrap(), self.key_id, |_| Spent::default())
                    .await
                    .unwrap();
            }
            Op::ExpireAll => {
                jobs::expire_queued(pool, 0).await.unwrap();
            }
            _ => {}
        }
    }

    async fn check_invariants(&self) {
        let (in_flight, reserved, spent): (i64, i64, i64) = sqlx::query_as(
            "SELECT in_flight::bigint, reserved_micro_usd, spent_micro_usd
               FROM tollgate.key_counters WHERE key_id = $1",
        )
        .bind(self.key_id)
        .fetch_one(&self.env.pool)
        .await
        .unwrap();
        let (open, open_reserved, charged, total): (i64, i64, i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE status IN ('queued', 'in_progress')),
                    coalesce(sum(reserved_micro_usd) FILTER (WHERE status IN ('queued', 'in_progress')), 0)::bigint,
                    coalesce(sum(charged_micro_usd) FILTER (WHERE status NOT IN ('queued', 'in_progress')), 0)::bigint,
                    count(*)
               FROM tollgate.jobs WHERE key_id = $1",
        )
        .bind(self.key_id)
        .fetch_one(&self.env.pool)
        .await
        .unwrap();
        let window: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(requests), 0)::bigint FROM tollgate.rate_windows WHERE key_id = $1",
        )
        .bind(self.key_id)
        .fetch_one(&self.env.pool)
        .await
        .unwrap();
        assert_eq!(in_flight, open, "in_flight = open jobs");
        assert!(in_flight <= 3, "in_flight {in_flight} over the limit");
        assert_eq!(
            reserved, open_reserved,
            "reserved = open jobs' reservations"
        );
        assert_eq!(spent, charged, "spent = charges of finished jobs");
        assert!(
            spent + reserved <= self.budget,
            "spent {spent} + reserved {reserved} > budget {}",
            self.budget
        );
        assert_eq!(window, total, "the window counts every admitted job, once");
        assert_eq!(total as usize, self.jobs.len());
    }
}

#[test]
fn counters_keep_their_invariants_under_random_sequences() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let env = rt.block_on(TestEnv::front_only(vec![ModelConfig::mock("mock-1")]));
    let admission = Admission::new(env.pool.clone(), Arc::clone(&env.config)).unwrap();
    let mut runner = TestRunner::new(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    });
    runner
        .run(&proptest::collection::vec(op(), 1..40), |ops| {
            rt.block_on(async {
                // A fresh key per case: its counters start at zero.
                let budget = MicroUsd::from_usd(0.02).unwrap();
                let (key_id, secret) = keys::create(
                    &env.pool,
                    &NewKey {
                        name: "property".into(),
                        rpm_limit: Some(10_000),
                        max_in_flight: Some(3),
                        budget: Some(budget),
                        ..Default::default()
                    },
                )
                .await
                .unwrap();
                let mut run = Run {
                    env: &env,
                    admission: &admission,
                    secret,
                    key_id,
                    budget: budget.0,
                    jobs: Vec::new(),
                };
                for op in &ops {
                    run.apply(op).await;
                    run.check_invariants().await;
                }
            });
            Ok(())
        })
        .unwrap();
    drop(env);
}
