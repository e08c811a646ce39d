//! tollgate's RabbitMQ topology as data: the steps [`super::declare_topology`] takes, in order, and
//! the same topology as a RabbitMQ definitions file (`deploy/rabbitmq-definitions.json` is it for
//! the default configuration, and a test holds the two together).

use lapin::ExchangeKind;
use serde_json::{json, Value};

use super::{ROUTING_KEY, WEBHOOK_BINDINGS};
use crate::config::{Config, BROKER_DELIVERY_LIMIT};

/// A queue argument's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Text(String),
    Int(i64),
}

/// One declaration.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// A durable exchange.
    Exchange { name: String, kind: ExchangeKind },
    /// A durable queue with these arguments.
    Queue {
        name: String,
        args: Vec<(&'static str, Arg)>,
    },
    Bind {
        queue: String,
        exchange: String,
        routing_key: String,
    },
}

/// What tollgate declares for `full`, in order. The events exchange comes first, and the jobs
/// queue and its binding before the delay queues, so that a process that sees the jobs queue can
/// count on the exchanges it publishes to.
pub fn steps(full: &Config) -> Vec<Step> {
    let amqp = &full.amqp;
    let text = |s: &str| Arg::Text(s.to_string());
    let quorum = || ("x-queue-type", text("quorum"));
    let bind = |queue: &str, exchange: &str, routing_key: &str| Step::Bind {
        queue: queue.into(),
        exchange: exchange.into(),
        routing_key: routing_key.into(),
    };
    let mut steps = vec![Step::Exchange {
        name: full.events.exchange.clone(),
        kind: ExchangeKind::Topic,
    }];
    if full.webhooks.enabled {
        let hooks = &full.webhooks;
        steps.push(Step::Queue {
            name: hooks.queue.clone(),
            args: vec![quorum()],
        });
        steps.extend(
            WEBHOOK_BINDINGS
                .iter()
                .map(|key| bind(&hooks.queue, &full.events.exchange, key)),
        );
        steps.push(Step::Queue {
            name: hooks.dead_letter_queue(),
            args: vec![quorum()],
        });
        // A retry waits for its own expiration, then goes back to the webhooks queue through
        // the default exchange.
        steps.extend(hooks.delay_queues().into_iter().map(|name| Step::Queue {
            name,
            args: vec![
                quorum(),
                ("x-dead-letter-exchange", text("")),
                ("x-dead-letter-routing-key", text(&hooks.queue)),
            ],
        }));
    }
    steps.extend([
        Step::Exchange {
            name: amqp.dead_letter_exchange.clone(),
            kind: ExchangeKind::Fanout,
        },
        Step::Queue {
            name: amqp.dead_letter_queue.clone(),
            args: vec![quorum()],
        },
        bind(&amqp.dead_letter_queue, &amqp.dead_letter_exchange, ""),
        Step::Exchange {
            name: amqp.exchange.clone(),
            kind: ExchangeKind::Direct,
        },
        Step::Queue {
            name: amqp.queue.clone(),
            args: vec![
                quorum(),
                ("x-dead-letter-exchange", text(&amqp.dead_letter_exchange)),
                ("x-delivery-limit", Arg::Int(BROKER_DELIVERY_LIMIT.into())),
            ],
        },
        bind(&amqp.queue, &amqp.exchange, ROUTING_KEY),
    ]);
    // Delay queues: a message waits for its own expiration, then dead-letters back to the jobs
    // exchange. Queues expire messages at their head only, so each queue holds waits of one kind
    // (a retry level, Retry-After, a database outage) that end in about the order they began.
    // They are quorum queues too (message TTL needs RabbitMQ 3.10 or later): a classic queue
    // lives on one node, and in a cluster that node's loss would take the waiting messages with
    // it, and make every declaration of the topology fail until it is back.
    steps.extend(
        amqp.delay_queues(full.worker.max_attempts)
            .into_iter()
            .map(|name| Step::Queue {
                name,
                args: vec![
                    quorum(),
                    ("x-dead-letter-exchange", text(&amqp.exchange)),
                    ("x-dead-letter-routing-key", text(ROUTING_KEY)),
                ],
            }),
    );
    steps
}

/// The topology of `full` as a RabbitMQ definitions file (vhost `/`), to import with
/// `rabbitmqctl import_definitions` or the management plugin's `load_definitions`.
pub fn definitions(full: &Config) -> Value {
    let (mut exchanges, mut queues, mut bindings) = (vec![], vec![], vec![]);
    for step in steps(full) {
        match step {
            Step::Exchange { name, kind } => exchanges.push(json!({
                "name": name, "vhost": "/", "type": kind_name(&kind), "durable": true,
                "auto_delete": false, "internal": false, "arguments": {},
            })),
            Step::Queue { name, args } => {
                let arguments: serde_json::Map<String, Value> = args
                    .into_iter()
                    .map(|(k, v)| {
                        let v = match v {
                            Arg::Text(s) => json!(s),
                            Arg::Int(n) => json!(n),
                        };
                        (k.to_string(), v)
                    })
                    .collect();
                queues.push(json!({
                    "name": name, "vhost": "/", "durable": true, "auto_delete": false,
                    "arguments": arguments,
                }))
            }
            Step::Bind {
                queue,
                exchange,
                routing_key,
            } => bindings.push(json!({
                "source": exchange, "vhost": "/", "destination": queue,
                "destination_type": "queue", "routing_key": routing_key, "arguments": {},
            })),
        }
    }
    json!({
        "rabbitmq_version": "3.10.8",
        "vhosts": [{"name": "/"}],
        "exchanges": exchanges,
        "queues": queues,
        "bindings": bindings,
    })
}

/// An exchange type as RabbitMQ names it.
fn kind_name(kind: &ExchangeKind) -> &str {
    match kind {
        ExchangeKind::Custom(name) => name,
        ExchangeKind::Direct => "direct",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Headers => "headers",
        ExchangeKind::Topic => "topic",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lists sorted by their JSON text, so that the order of declarations does not matter.
    fn normalised(mut definitions: Value) -> Value {
        for list in ["exchanges", "queues", "bindings"] {
            if let Some(items) = definitions[list].as_array_mut() {
                items.sort_by_key(|v| v.to_string());
            }
        }
        definitions
    }

    #[test]
    fn the_shipped_definitions_file_is_what_tollgate_declares_by_default() {
        let shipped: Value =
            serde_json::from_str(include_str!("../../deploy/rabbitmq-definitions.json"))
                .expect("the definitions file is JSON");
        assert_eq!(
            normalised(shipped),
            normalised(definitions(&Config::default())),
            "deploy/rabbitmq-definitions.json differs from the default topology; write it anew \
             from queue::topology::definitions"
        );
    }

    #[test]
    fn no_queue_argument_depends_on_a_setting_that_may_change() {
        let mut a = Config::default();
        let mut b = Config::default();
        a.worker.max_attempts = 2;
        b.worker.max_attempts = 4;
        a.amqp.delivery_limit = 5;
        b.amqp.delivery_limit = 50;
        let args = |c: &Config| -> Vec<(String, Vec<(&'static str, Arg)>)> {
            steps(c)
                .into_iter()
                .filter_map(|s| match s {
                    Step::Queue { name, args } => Some((name, args)),
                    _ => None,
                })
                .collect()
        };
        let (qa, qb) = (args(&a), args(&b));
        for (name, arguments) in &qa {
            if let Some((_, other)) = qb.iter().find(|(n, _)| n == name) {
                assert_eq!(arguments, other, "{name}");
            }
        }
    }
}
