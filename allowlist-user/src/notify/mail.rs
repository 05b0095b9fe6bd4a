//! E-mail through the configured SMTP relay (lettre): STARTTLS when the
//! relay offers it (or always, or never, per `[notify.smtp] tls`).

use std::time::Duration;

use lettre::{
    AsyncSmtpTransport, AsyncTransport, Tokio1Executor,
    message::{Mailbox, header::ContentType},
    transport::smtp::client::{Tls, TlsParameters},
};

use crate::config::{SmtpConfig, SmtpTls};

/// Sends one message to `to`; the error says what failed (never a secret:
/// the message holds none).
pub async fn send(
    smtp: &SmtpConfig,
    to: &[String],
    subject: &str,
    text: &str,
    message_id: &str,
) -> Result<(), String> {
    let from: Mailbox = smtp
        .from
        .parse()
        .map_err(|e| format!("[notify.smtp] from {:?}: {e}", smtp.from))?;
    let domain = smtp
        .from
        .rsplit_once('@')
        .map(|(_, d)| d)
        .unwrap_or("localhost");
    let mut b = lettre::Message::builder()
        .from(from)
        .subject(subject)
        .message_id(Some(format!("<{message_id}@{domain}>")))
        .header(ContentType::TEXT_PLAIN);
    for t in to {
        b = b.to(t.parse().map_err(|e| format!("recipient {t:?}: {e}"))?);
    }
    let mail = b
        .body(text.to_string())
        .map_err(|e| format!("building the message: {e}"))?;
    let (host, port) = smtp
        .relay
        .rsplit_once(':')
        .and_then(|(h, p)| {
            Some((
                h.trim_start_matches('[').trim_end_matches(']'),
                p.parse().ok()?,
            ))
        })
        .ok_or_else(|| format!("[notify.smtp] relay {:?} is not host:port", smtp.relay))?;
    let params =
        || TlsParameters::new(host.to_string()).map_err(|e| format!("TLS for {host}: {e}"));
    let tls = match smtp.tls {
        SmtpTls::Opportunistic => Tls::Opportunistic(params()?),
        SmtpTls::Required => Tls::Required(params()?),
        SmtpTls::None => Tls::None,
    };
    let transport = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(host)
        .port(port)
        .tls(tls)
        .timeout(Some(Duration::from_secs(30)))
        .build();
    transport
        .send(mail)
        .await
        .map(|_| ())
        .map_err(|e| format!("relay {}: {e}", smtp.relay))
}
