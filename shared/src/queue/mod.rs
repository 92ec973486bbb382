//! RabbitMQ: the topology every role declares and the confirming publisher; what travels on
//! it is a [`crate::jobs::Job`].

mod publisher;
mod topology;

pub use publisher::{
    Outgoing, PublishError, Publisher, open_confirm_channel, publish_confirmed, publish_each,
};
pub use topology::{DELIVERY_LIMIT, Topology};

use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};

/// Opens a connection; the broker password is only in the URL, which is never logged.
pub async fn connect(amqp_url: &SecretString, name: &str) -> lapin::Result<Connection> {
    let properties = ConnectionProperties::default().with_connection_name(name.into());
    Connection::connect(amqp_url.expose_secret(), properties).await
}

/// Where `amqp_url` points, as `host:port` (never its credentials), and what to do when nobody
/// answers there: logged once per outage by every role that connects.
pub fn unreachable_hint(amqp_url: &SecretString) -> String {
    let url = amqp_url.expose_secret();
    let after_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = after_scheme.split(['/', '?']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let default_port = if url.starts_with("amqps") { 5671 } else { 5672 };
    let address = if host_port
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        host_port.to_string()
    } else {
        format!("{host_port}:{default_port}")
    };
    format!(
        "is RabbitMQ running at {address} (AMQP_URL)? `scripts/up` installs and starts a local \
         one; or start yours (`rabbitmq-server -detached`) or point AMQP_URL at it"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unreachable_hint_names_the_address_and_never_the_password() {
        let hint = unreachable_hint(&"amqp://guest:s3cret@10.0.0.5/%2f".into());
        assert!(hint.contains("10.0.0.5:5672"), "{hint}");
        assert!(!hint.contains("s3cret"), "{hint}");
        let hint = unreachable_hint(&"amqps://u:p@broker.example:5999/vh?heartbeat=5".into());
        assert!(hint.contains("broker.example:5999"), "{hint}");
        assert!(!hint.contains("u:p"), "{hint}");
    }
}
