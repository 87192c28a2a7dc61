//! `amqp` in a build without the `amqp-report` feature: no lapin, no
//! tokio. The config already refuses `[agent] transport_url`
//! ([`crate::config::AMQP_REPORT`]); [`start`] refuses too, with the same
//! error, for a caller that built the settings itself. A [`Reporter`]
//! holds an empty enum: none can exist (the field is private, so the
//! agent's code holding an `Option<Reporter>` is not unreachable code).

use std::fmt;

use super::{AgentFacts, ReportConfig};

/// No value: this build cannot report.
enum Never {}

/// The reporting thread; none exists in this build.
pub struct Reporter(Never);

impl fmt::Debug for Reporter {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {}
    }
}

/// Refuse: this metaproxy was built without the `amqp-report` feature.
///
/// # Errors
/// Always ([`std::io::ErrorKind::Unsupported`]):
/// [`crate::config::AMQP_REPORT`]'s refusal of `agent.transport_url`.
pub fn start(cfg: ReportConfig, _facts: AgentFacts) -> std::io::Result<Reporter> {
    let url = format!("{:?}", cfg.transport.redacted());
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        crate::config::AMQP_REPORT
            .refusal("agent.transport_url", &url)
            .to_string(),
    ))
}
