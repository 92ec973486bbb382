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
