//! herald: a queue-driven delivery worker for IM notifications.
//!
//! Producers publish JSON jobs ([`job`]) to RabbitMQ; workers consume each
//! account's lane ([`lane`]), wait for the account's rate limiter ([`limit`]),
//! call the vendor ([`vendor`]) and turn its answer into an outcome
//! ([`outcome`]): ack, a delayed retry through a tier queue, a lane pause, or
//! the dead-letter queue ([`dlq`]) with a reason an operator can act on.

pub mod alloc;
pub mod audit;
pub mod ban;
pub mod breaker;
pub mod broker;
pub mod callback;
pub mod cli;
pub mod config;
pub mod console;
pub mod constant_time;
pub mod demo;
pub mod dlq;
pub mod enqueue;
pub mod envelope;
pub mod http;
pub mod http_enqueue;
pub mod in_flight;
pub mod job;
pub mod lane;
pub mod lease;
pub mod limit;
pub mod logging;
pub mod metrics;
pub mod migrate;
pub mod outcome;
pub mod redact;
pub mod sandbox;
pub mod schedule;
pub mod telemetry;
pub mod topology;
pub mod vendor;
pub mod worker;
