//! A RabbitMQ node of one test's own, beside the shared broker: its own node name, AMQP and
//! distribution ports, config, plugins file and data folders under one temporary folder, so it
//! can be started and stopped without touching what other tests use. Stopped (and its folder
//! removed) when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::broker::unique_prefix;

/// A node that is not running yet: [`LocalBrokerNode::env`] is what `rabbitmq-server` needs to
/// start it (the quick start does, with these variables in its environment).
pub struct LocalBrokerNode {
    /// The Erlang node name (`rabbitmqctl -n` takes it).
    pub name: String,
    /// The AMQP port on 127.0.0.1.
    pub port: u16,
    /// Its config, plugins file, data and logs: removed on drop.
    pub dir: PathBuf,
    /// The distribution port (other nodes and rabbitmqctl reach it there).
    dist_port: u16,
}

impl LocalBrokerNode {
    /// Prepares a node's folder, or `None` (with the reason printed) where this machine cannot
    /// run one: no `rabbitmq-server`, or no way to hand the folder to the `rabbitmq` user that
    /// the Debian wrapper runs the server as.
    pub fn prepare() -> Option<Self> {
        if !on_path("rabbitmq-server") || !on_path("rabbitmqctl") {
            eprintln!("skipped: rabbitmq-server is not installed");
            return None;
        }
        let name = format!("fbsync-{}@localhost", unique_prefix());
        let dir = std::env::temp_dir().join(name.replace('@', "-"));
        std::fs::create_dir_all(&dir).expect("node dir");
        let (port, dist_port) = (free_port(), free_port());
        std::fs::write(
            dir.join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n"),
        )
        .expect("node config");
        std::fs::write(dir.join("enabled_plugins"), "[].\n").expect("plugins file");
        if let Err(reason) = hand_to_rabbitmq_user(&dir) {
            eprintln!("skipped: {reason}");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        Some(Self {
            name,
            port,
            dir,
            dist_port,
        })
    }

    /// `AMQP_URL` for this node.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The variables that make `rabbitmq-server -detached` start this node and no other.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = |file: &str| self.dir.join(file).display().to_string();
        vec![
            ("RABBITMQ_NODENAME".into(), self.name.clone()),
            ("RABBITMQ_CONFIG_FILE".into(), path("rabbitmq.conf")),
            (
                "RABBITMQ_ENABLED_PLUGINS_FILE".into(),
                path("enabled_plugins"),
            ),
            ("RABBITMQ_MNESIA_BASE".into(), path("mnesia")),
            ("RABBITMQ_LOG_BASE".into(), path("log")),
            ("RABBITMQ_PID_FILE".into(), path("pid")),
            ("RABBITMQ_DIST_PORT".into(), self.dist_port.to_string()),
        ]
    }

    /// Whether the node answers on its AMQP port.
    pub fn is_listening(&self) -> bool {
        std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
    }
}

impl Drop for LocalBrokerNode {
    fn drop(&mut self) {
        // Stopping a node that never started fails quickly: nothing to undo then.
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.name, "stop"])
            .envs(self.env())
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn on_path(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Debian's `rabbitmq-server` runs the server as the `rabbitmq` user when started by root: the
/// folder must be theirs.
fn hand_to_rabbitmq_user(dir: &Path) -> Result<(), String> {
    let uid = Command::new("id")
        .args(["-u", "rabbitmq"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .parse::<u32>()
                .ok()
        })
        .ok_or("there is no rabbitmq user")?;
    for entry in [
        dir.to_path_buf(),
        dir.join("rabbitmq.conf"),
        dir.join("enabled_plugins"),
    ] {
        std::os::unix::fs::chown(&entry, Some(uid), None)
            .map_err(|e| format!("cannot hand {} to the rabbitmq user: {e}", entry.display()))?;
    }
    Ok(())
}
