//! A TCP chaos proxy: stands between a worker and RabbitMQ so a test can cut
//! every connection and refuse new ones, as a broker restart would, without
//! touching the broker that other tests share. [`ConsumeGate`] instead holds a
//! client's first `basic.consume`, so a test can act at a chosen point of its protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, broadcast, watch};

pub struct Proxy {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: broadcast::Sender<()>,
    stalled: watch::Sender<bool>,
    sever: broadcast::Sender<()>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = broadcast::channel(4);
        let (stalled, _) = watch::channel(false);
        let (sever, _) = broadcast::channel(4);
        let (accepting, cutter, staller, severer) =
            (up.clone(), cut.clone(), stalled.clone(), sever.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused as by a broker that is down
                }
                let (mut cut, mut sever) = (cutter.subscribe(), severer.subscribe());
                let mut stalled = staller.subscribe();
                let (to_server, to_client) = (staller.subscribe(), staller.subscribe());
                tokio::spawn(async move {
                    let Ok(server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (mut from_client, mut client_out) = client.into_split();
                    let (mut from_server, mut server_out) = server.into_split();
                    // Either direction ending (or a cut) drops both sockets.
                    tokio::select! {
                        _ = pump(&mut from_client, &mut server_out, to_server) => {}
                        _ = pump(&mut from_server, &mut client_out, to_client) => {}
                        _ = cut.recv() => {}
                        _ = sever.recv() => {
                            // The broker's side closes; the client hears nothing until the stall ends.
                            drop((from_server, server_out));
                            let _ = stalled.wait_for(|s| !*s).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            up,
            cut,
            stalled,
            sever,
        }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }

    /// Stops forwarding in both directions without closing anything, as a
    /// link that silently drops packets: no RST, no FIN, just silence. New
    /// connections are accepted and stay silent too.
    pub fn stall(&self) {
        self.stalled.send_replace(true);
    }

    /// During a stall, closes the broker's side of every connection, as the
    /// broker does with a peer it has not heard from for a heartbeat timeout
    /// (handing its single-active-consumer lanes to another replica); the
    /// client's side stays silent and open until [`Proxy::resume`], then closes.
    pub fn sever_upstream(&self) {
        let _ = self.sever.send(());
    }

    /// Forwards again what waited in the sockets, as TCP retransmits once a link heals.
    pub fn resume(&self) {
        self.stalled.send_replace(false);
    }
}

/// Copies `from` to `to`, holding still while `stalled`.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let n = tokio::select! {
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            // A stall that begins while waiting for data: stop reading.
            _ = stalled.wait_for(|s| *s) => continue,
        };
        // A chunk read just as the stall began waits for its end.
        if stalled.wait_for(|s| !*s).await.is_err() || to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Forwards AMQP traffic but holds the first `basic.consume` any client sends
/// (and everything the client sends after it) until [`ConsumeGate::release`]
/// (a consume on the DLQ reader lock passes: the reader counts the queue after it):
/// a test can act after a DLQ reader counted the queue and before it consumes,
/// the window in which two readers race.
pub struct ConsumeGate {
    pub addr: SocketAddr,
    held: watch::Receiver<bool>,
    release: Arc<Notify>,
}

/// AMQP `basic.consume`: class 60, method 20.
const BASIC_CONSUME: [u8; 4] = [0, 60, 0, 20];

/// A `basic.consume` payload (after class and method: reserved short, queue
/// short string) on a DLQ's reader lock, which a reader takes before it counts the queue.
fn is_reader_lock(payload: &[u8]) -> bool {
    let Some(&len) = payload.get(6) else {
        return false;
    };
    payload
        .get(7..7 + usize::from(len))
        .is_some_and(|queue| queue.ends_with(b".dlq.reader"))
}

impl ConsumeGate {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (held_tx, held) = watch::channel(false);
        let held_tx = Arc::new(held_tx);
        let release = Arc::new(Notify::new());
        let once = Arc::new(AtomicBool::new(false));
        let gate = release.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_server, mut to_server) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
                });
                let (held_tx, gate, once) = (held_tx.clone(), gate.clone(), once.clone());
                tokio::spawn(async move {
                    let mut protocol = [0u8; 8];
                    if from_client.read_exact(&mut protocol).await.is_err()
                        || to_server.write_all(&protocol).await.is_err()
                    {
                        return;
                    }
                    // Frames: type (1), channel (2), size (4), payload, end marker (1).
                    let mut header = [0u8; 7];
                    while from_client.read_exact(&mut header).await.is_ok() {
                        let size = u32::from_be_bytes(header[3..7].try_into().unwrap()) as usize;
                        let mut rest = vec![0u8; size + 1];
                        if from_client.read_exact(&mut rest).await.is_err() {
                            return;
                        }
                        if header[0] == 1
                            && rest.starts_with(&BASIC_CONSUME)
                            && !is_reader_lock(&rest)
                            && !once.swap(true, Ordering::SeqCst)
                        {
                            let _ = held_tx.send(true);
                            gate.notified().await;
                        }
                        if to_server.write_all(&header).await.is_err()
                            || to_server.write_all(&rest).await.is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            held,
            release,
        }
    }

    /// Waits until a client's `basic.consume` is held.
    pub async fn held(&mut self) {
        self.held.wait_for(|held| *held).await.unwrap();
    }

    /// Lets the held `basic.consume` through.
    pub fn release(&self) {
        self.release.notify_one();
    }
}
