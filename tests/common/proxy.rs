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
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let (cut, _) = broadcast::channel(4);
        let (accepting, cutter) = (up.clone(), cut.clone());
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if !accepting.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused as by a broker that is down
                }
                let mut cut = cutter.subscribe();
                tokio::spawn(async move {
                    let Ok(mut server) = TcpStream::connect(upstream).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.recv() => {}
                    }
                });
            }
        });
        Self { addr, up, cut }
    }

    /// Cuts every open connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        let _ = self.cut.send(());
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

/// Forwards AMQP traffic but holds the first `basic.consume` any client sends
/// (and everything the client sends after it) until [`ConsumeGate::release`]:
/// a test can act after a DLQ reader counted the queue and before it consumes,
/// the window in which two readers race.
pub struct ConsumeGate {
    pub addr: SocketAddr,
    held: watch::Receiver<bool>,
    release: Arc<Notify>,
}

/// AMQP `basic.consume`: class 60, method 20.
const BASIC_CONSUME: [u8; 4] = [0, 60, 0, 20];

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
