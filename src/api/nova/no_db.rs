//! `source` in a build without the `nova-db` feature: no database thread,
//! no sqlx, no tokio. The config already refuses `[api] source = "nova"`
//! ([`crate::config::NOVA_DB`]); [`start`] refuses too, with the same
//! error, for a caller that built the settings itself. The client and the
//! source hold an empty enum, so none can exist and their methods are
//! proven unreachable by the compiler (`match self.0 {}`) instead of
//! returning a made-up answer. The field is private, so outside this file
//! the types count as inhabited and the server's Nova paths raise no
//! `unreachable_code` lint.
//!
//! Rejected: a `cfg` on every Nova path of the server, `main` and
//! `doctor` (five files to keep in step for one feature).

use super::{Lookup, NovaError, PasswordWrite, StartReport};
use crate::api::config::NovaSettings;

/// No value: this build cannot have a database thread.
#[derive(Debug, Clone, Copy)]
enum Never {}

/// The loops' handle to the database thread; none exists in this build.
#[derive(Clone, Debug)]
pub struct NovaClient(Never);

impl NovaClient {
    /// Unreachable: no [`NovaClient`] exists in this build.
    ///
    /// # Errors
    /// None: it cannot be called.
    pub async fn load(&self, _uuid: &str) -> Result<Lookup, NovaError> {
        match self.0 {}
    }

    /// Unreachable: no [`NovaClient`] exists in this build.
    ///
    /// # Errors
    /// None: it cannot be called.
    pub async fn set_password(
        &self,
        _uuid: &str,
        _password: &str,
    ) -> Result<PasswordWrite, NovaError> {
        match self.0 {}
    }
}

/// The database thread; none exists in this build.
#[derive(Debug)]
pub struct NovaSource(Never);

impl NovaSource {
    /// Unreachable: no [`NovaSource`] exists in this build.
    pub fn client(&self) -> NovaClient {
        match self.0 {}
    }

    /// Unreachable: no [`NovaSource`] exists in this build.
    pub fn stop(self) {
        match self.0 {}
    }
}

/// Refuse: this metaproxy was built without the `nova-db` feature.
///
/// # Errors
/// Always: [`crate::config::NOVA_DB`]'s refusal of `api.source`.
pub fn start(
    _settings: &NovaSettings,
    _dhcp_domain: String,
) -> Result<(NovaSource, StartReport), String> {
    Err(crate::config::NOVA_DB
        .refusal("api.source", "\"nova\"")
        .to_string())
}
