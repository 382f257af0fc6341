//! When the broker will not take a job's retry copy: a refused copy hands the
//! job back with a reject (so it ends as `poison`), and a dead publishing
//! channel ends the session instead of redelivering the job in a tight loop.
//! Run on RabbitMQ 3.x and 4.x (`make test-rabbitmq4`).

mod common;

use std::time::{Duration, Instant};

use common::{Options, fault, spawn_app, wait_until};
use herald::sandbox::FaultAnswer;
use herald::topology::Topology;
use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_retry_copy_the_broker_refuses_ends_as_poison() {
    let app = spawn_app(
        "refused-copy",
        Options {
            tiers: vec!["200ms"],
            worker_extra: "delivery_limit = 2",
            ..Options::default()
        },
    )
    .await;
    // With its tier queue gone, the retry copy is unroutable: the broker returns it.
    let channel = app.conn.create_channel().await.unwrap();
    channel
        .queue_delete(
            app.names
                .retry_queue(Duration::from_millis(200))
                .as_str()
                .into(),
            QueueDeleteOptions::default(),
        )
        .await
        .unwrap();
    app.sandbox
        .add_fault(fault("netease", "u-refused", 100, FaultAnswer::Code(500)));
    app.publish(&app.job("refused-1", "u-refused")).await;

    app.wait_for_dead(1, Duration::from_secs(30)).await;
    let dead = app.dead_jobs().await;
    assert_eq!(dead[0].id.as_deref(), Some("refused-1"));
    assert_eq!(
        dead[0].reason,
        herald::outcome::Reason::Poison,
        "a job handed back after every failed copy ends as poison: {dead:?}"
    );
    let requests = app.netease_stats().requests;
    assert!(
        (2..=4).contains(&requests),
        "one attempt per delivery up to the delivery limit of 2, not a loop: {requests} requests"
    );
    // Put the tier queue back for the topology clean-up.
    Topology::from_config(&app.config)
        .declare(&app.conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_publishing_channel_ends_the_session_instead_of_looping() {
    let app = spawn_app(
        "dead-publisher",
        Options {
            tiers: vec!["200ms"],
            worker_extra: "delivery_limit = 50",
            ..Options::default()
        },
    )
    .await;
    let health = app.health.clone().unwrap();
    // Publishing to an exchange that does not exist closes the publisher's channel.
    let channel = app.conn.create_channel().await.unwrap();
    channel
        .exchange_delete(
            app.names.retry_exchange().as_str().into(),
            ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    app.sandbox
        .add_fault(fault("netease", "u-dead-pub", 1, FaultAnswer::Code(500)));
    app.publish(&app.job("dead-pub-1", "u-dead-pub")).await;

    let h = health.clone();
    wait_until("the session ends", Duration::from_secs(10), move || {
        !h.is_ready()
    })
    .await;
    let unready_at = Instant::now();
    // The next session declares the topology again, the exchange with it, and the job goes through.
    app.wait_for_delivered(1, Duration::from_secs(30)).await;
    let h = health.clone();
    wait_until("ready again", Duration::from_secs(10), move || h.is_ready()).await;
    let requests = app.netease_stats().requests;
    eprintln!(
        "dead publisher: {requests} requests for the job, ready again after {:?}",
        unready_at.elapsed()
    );
    assert!(
        requests <= 3,
        "the failed attempt, at most one redelivery before the session ended, and the delivery: {requests}"
    );
    assert_eq!(app.dlq_depth().await, 0);
}
