//! The shared RabbitMQ as one test sees it: a queue prefix of its own, its queues read back and
//! deleted, and a TCP proxy that cuts the test's own path to the broker (other tests keep
//! theirs).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fbsync_shared::facebook::event::EventMessage;
use fbsync_shared::jobs::JobKind;
use fbsync_shared::queue::{Topology, connect};
use lapin::options::{
    BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A queue prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("test-{}", uuid::Uuid::new_v4().simple())
}

/// Takes every message waiting in `queue`.
#[allow(dead_code)] // The reliability target reads its queues with rabbitmqctl instead.
pub async fn drain_queue(queue: &str) -> Vec<EventMessage> {
    drain_queue_bodies(queue)
        .await
        .iter()
        .map(|body| serde_json::from_slice(body).expect("an event message"))
        .collect()
}

/// Takes every message ready in `queue`: their bodies.
pub async fn drain_queue_bodies(queue: &str) -> Vec<Vec<u8>> {
    let connection = connect(&AMQP_URL.into(), "fbsync-test-drain")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let mut bodies = Vec::new();
    while let Some(message) = channel
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
    {
        bodies.push(message.delivery.data);
    }
    let _ = connection.close(200, "done".into()).await;
    bodies
}

/// Messages ready in `queue` (not counting the ones delivered and not yet acked).
pub async fn queue_depth(queue: &str) -> u32 {
    let connection = connect(&AMQP_URL.into(), "fbsync-test-depth")
        .await
        .expect("broker");
    let channel = connection.create_channel().await.expect("channel");
    let declared = channel
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("queue {queue}: {e}"));
    let _ = connection.close(200, "done".into()).await;
    declared.message_count()
}

/// Deletes the exchanges and queues of `prefix` (best effort).
pub async fn delete_topology(prefix: &str) {
    let topology = Topology::new(prefix);
    let Ok(connection) = connect(&AMQP_URL.into(), "fbsync-test-cleanup").await else {
        return;
    };
    let Ok(channel) = connection.create_channel().await else {
        return;
    };
    let mut queues = vec![topology.dead()];
    for &kind in JobKind::ALL {
        queues.push(topology.queue(kind));
        queues.push(topology.delay_queue(kind));
    }
    for queue in queues {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in [topology.events_exchange(), topology.dead()] {
        let _ = channel
            .exchange_delete(exchange.into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = connection.close(200, "done".into()).await;
}

/// A TCP proxy in front of one target that the test can cut and restore: the test's own path to
/// the broker or to PostgreSQL, so other tests keep theirs.
pub struct TcpProxy {
    pub addr: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl TcpProxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (accept_cut, accept_connections) = (cut.clone(), connections.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if accept_cut.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_connections.lock().expect("lock").push(task);
            }
        });
        Self {
            addr,
            cut,
            connections,
        }
    }

    /// Drops every open connection and refuses new ones until [`restore`](Self::restore).
    pub fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for task in self.connections.lock().expect("lock").drain(..) {
            task.abort();
        }
    }

    pub fn restore(&self) {
        self.cut.store(false, Ordering::SeqCst);
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.addr)
    }
}
