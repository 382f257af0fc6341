//! The vendor every throughput, latency and RSS bench sends to: a small HTTP
//! server run as a child process (`herald-bench receiver`), so that it is a
//! process apart from the worker being measured, as a real vendor is.
//!
//! It answers OpenIM's `/auth/get_admin_token` and
//! `/msg/send_business_notification` with success (whatever the path prefix),
//! counts arrivals, and records when each job arrived: rates and latencies are
//! measured here, on arrival, not by the worker. Bench control routes:
//! `GET /_bench/stats`, `POST /_bench/reset`, `POST /_bench/latency?us=N`.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use axum::Router;
use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use serde::{Deserialize, Serialize};

/// Microseconds since the Unix epoch; the publisher stamps jobs with the same clock.
pub fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the receiver has seen since its last reset.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Stats {
    /// Job requests received, duplicates included.
    pub arrivals: u64,
    /// Distinct jobs (by the `seq` number in their body).
    pub unique: u64,
    /// Arrival of the first and the last job request, µs since the epoch.
    pub first_us: u64,
    pub last_us: u64,
    pub token_requests: u64,
    /// Arrival minus the `sent_us` stamped in the job at publish time, in µs,
    /// for jobs that carry one: p50, p90, p99, max.
    pub latency_us: Option<[u64; 4]>,
}

impl Stats {
    /// Jobs per second between the first and the last arrival.
    pub fn rate(&self) -> f64 {
        let span = self.last_us.saturating_sub(self.first_us) as f64 / 1e6;
        if span <= 0.0 {
            return 0.0;
        }
        (self.arrivals.saturating_sub(1)) as f64 / span
    }
}

#[derive(Default)]
struct Seen {
    orders: Vec<bool>,
    unique: u64,
    latencies: Vec<u32>,
}

#[derive(Default)]
struct Receiver {
    delay_us: AtomicU64,
    arrivals: AtomicU64,
    first_us: AtomicU64,
    last_us: AtomicU64,
    token_requests: AtomicU64,
    seen: Mutex<Seen>,
    message_ids: AtomicU64,
}

/// The number that follows `key` in `body` (after `":`, JSON escapes or
/// blanks), at the first place `key` is followed by one.
fn number_after(body: &[u8], key: &[u8]) -> Option<u64> {
    let mut from = 0;
    while let Some(found) = body[from..].windows(key.len()).position(|w| w == key) {
        let rest = &body[from + found + key.len()..];
        from += found + key.len();
        let start = rest.iter().position(u8::is_ascii_digit)?;
        if rest[..start]
            .iter()
            .all(|b| matches!(b, b'"' | b'\\' | b':' | b' '))
        {
            let digits = rest[start..].iter().take_while(|b| b.is_ascii_digit());
            return Some(digits.fold(0u64, |n, d| {
                n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
            }));
        }
    }
    None
}

impl Receiver {
    fn arrive(&self, body: &[u8]) {
        let now = unix_us();
        self.arrivals.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .first_us
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
        self.last_us.fetch_max(now, Ordering::Relaxed);
        let order = number_after(body, b"\"seq");
        let sent = number_after(body, b"\"sent_us");
        let mut seen = self.seen.lock().expect("receiver lock");
        if let Some(order) = order.map(|o| o as usize) {
            if seen.orders.len() <= order {
                seen.orders.resize(order + 1, false);
            }
            if !std::mem::replace(&mut seen.orders[order], true) {
                seen.unique += 1;
            }
        }
        if let Some(sent) = sent {
            seen.latencies
                .push(now.saturating_sub(sent).min(u64::from(u32::MAX)) as u32);
        }
    }

    fn stats(&self) -> Stats {
        let mut seen = self.seen.lock().expect("receiver lock");
        let latency_us = (!seen.latencies.is_empty()).then(|| {
            seen.latencies.sort_unstable();
            let at = |q: f64| {
                let l = &seen.latencies;
                u64::from(l[((l.len() - 1) as f64 * q).round() as usize])
            };
            [at(0.5), at(0.9), at(0.99), at(1.0)]
        });
        Stats {
            arrivals: self.arrivals.load(Ordering::Relaxed),
            unique: seen.unique,
            first_us: self.first_us.load(Ordering::Relaxed),
            last_us: self.last_us.load(Ordering::Relaxed),
            token_requests: self.token_requests.load(Ordering::Relaxed),
            latency_us,
        }
    }

    fn reset(&self) {
        let mut seen = self.seen.lock().expect("receiver lock");
        *seen = Seen::default();
        for n in [
            &self.arrivals,
            &self.first_us,
            &self.last_us,
            &self.token_requests,
        ] {
            n.store(0, Ordering::Relaxed);
        }
    }

    async fn delay(&self) {
        let us = self.delay_us.load(Ordering::Relaxed);
        if us > 0 {
            tokio::time::sleep(Duration::from_micros(us)).await;
        }
    }
}

type Shared = std::sync::Arc<Receiver>;

async fn admin_token(State(r): State<Shared>) -> &'static str {
    r.token_requests.fetch_add(1, Ordering::Relaxed);
    r.delay().await;
    r#"{"errCode":0,"errMsg":"","errDlt":"","data":{"token":"bench-admin-token","expireTimeSeconds":86400}}"#
}

async fn send(State(r): State<Shared>, body: axum::body::Bytes) -> String {
    r.arrive(&body);
    r.delay().await;
    let id = r.message_ids.fetch_add(1, Ordering::Relaxed);
    format!(
        r#"{{"errCode":0,"errMsg":"","errDlt":"","data":{{"serverMsgID":"{id:032x}","clientMsgID":"{id:032x}","sendTime":{}}}}}"#,
        unix_us() / 1000
    )
}

async fn stats(State(r): State<Shared>) -> axum::Json<Stats> {
    axum::Json(r.stats())
}

async fn reset(State(r): State<Shared>) -> &'static str {
    r.reset();
    "ok\n"
}

#[derive(Deserialize)]
struct Latency {
    us: u64,
}

async fn set_latency(State(r): State<Shared>, Query(l): Query<Latency>) -> &'static str {
    r.delay_us.store(l.us, Ordering::Relaxed);
    "ok\n"
}

/// Serves until killed; prints `listening <addr>` on stdout first.
pub async fn serve(listen: SocketAddr, latency: Duration) -> anyhow::Result<()> {
    let receiver = Shared::default();
    receiver
        .delay_us
        .store(latency.as_micros() as u64, Ordering::Relaxed);
    let app = Router::new()
        .route("/_bench/stats", get(stats))
        .route("/_bench/reset", post(reset))
        .route("/_bench/latency", post(set_latency))
        .route("/{*path}", post(vendor))
        .with_state(receiver);
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening {}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app).await?;
    Ok(())
}

/// Job and token requests by their last path segments, so any `base_url` prefix works.
async fn vendor(
    State(r): State<Shared>,
    axum::extract::Path(path): axum::extract::Path<String>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    if path.ends_with("msg/send_business_notification") {
        send(State(r), body).await.into_response()
    } else if path.ends_with("auth/get_admin_token") {
        admin_token(State(r)).await.into_response()
    } else {
        (axum::http::StatusCode::NOT_FOUND, "unknown path\n").into_response()
    }
}

/// The receiver child process, seen from the bench.
pub struct Handle {
    child: std::process::Child,
    pub addr: SocketAddr,
    http: reqwest::Client,
}

impl Handle {
    /// Starts `herald-bench receiver` and waits for its address.
    pub fn spawn(latency: Duration) -> anyhow::Result<Self> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args([
                "receiver",
                "--listen",
                "127.0.0.1:0",
                "--latency-us",
                &latency.as_micros().to_string(),
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("starting the receiver")?;
        let stdout = child.stdout.take().context("receiver stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line)?;
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .with_context(|| format!("receiver said {line:?}"))?
            .parse()?;
        Ok(Self {
            child,
            addr,
            http: reqwest::Client::new(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn stats(&self) -> anyhow::Result<Stats> {
        Ok(self
            .http
            .get(format!("{}/_bench/stats", self.url()))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?)
    }

    pub async fn reset(&self) -> anyhow::Result<()> {
        self.http
            .post(format!("{}/_bench/reset", self.url()))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    pub async fn set_latency(&self, latency: Duration) -> anyhow::Result<()> {
        self.http
            .post(format!(
                "{}/_bench/latency?us={}",
                self.url(),
                latency.as_micros()
            ))
            .send()
            .await?
            .error_for_status()?;
        Ok(())
    }

    /// Waits until `n` distinct jobs arrived; fails after `timeout` without progress.
    pub async fn wait_for(&self, n: u64, timeout: Duration) -> anyhow::Result<Stats> {
        let mut last = (0, std::time::Instant::now());
        loop {
            let stats = self.stats().await?;
            if stats.unique >= n {
                return Ok(stats);
            }
            if stats.unique != last.0 {
                last = (stats.unique, std::time::Instant::now());
            } else if last.1.elapsed() > timeout {
                anyhow::bail!(
                    "no progress for {timeout:?}: {} of {n} jobs arrived",
                    stats.unique
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_found_in_a_job_and_in_openim_s_escaped_data() {
        let job = br#"{"key":"seq.1","data":{"seq":42,"sent_us":1700000000000001}}"#;
        assert_eq!(number_after(job, b"\"seq"), Some(42));
        assert_eq!(number_after(job, b"\"sent_us"), Some(1_700_000_000_000_001));
        let openim = br#"{"key":"k","data":"{\"seq\":7,\"sent_us\":99}"}"#;
        assert_eq!(number_after(openim, b"\"seq"), Some(7));
        assert_eq!(number_after(openim, b"\"sent_us"), Some(99));
        assert_eq!(number_after(br#"{"seq":"x1"}"#, b"\"seq"), None);
    }
}
