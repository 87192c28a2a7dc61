//! The database side of the Nova source: one thread with a tokio runtime
//! of its own (the one `sqlx` needs), a dispatcher task owning the cache,
//! and the loops' [`NovaClient`] that hands it jobs over a channel and
//! awaits the answer on a oneshot. A serving loop never waits on a socket
//! of the database: it awaits a channel, which any runtime can.
//!
//! Cache and single flight (Nova's `metadata_cache_expiration`): the
//! dispatcher is the only owner of the map, so no lock: a load for an
//! instance already being read joins its waiters; a fresh entry answers
//! at once; an expired one is read again. Only successful loads are kept
//! (a missing instance or a database error is asked again next time, as
//! Nova does). A password write drops the entry (and marks a read in
//! flight as not to be cached) before its answer is sent, so the POST's
//! own node never serves the old password; other nodes see it once their
//! entry expires, as other Nova workers do.
//!
//! Rejected: a per-loop cache in front (saves the channel round trip on a
//! hit, costs N copies and N invalidations); `spawn_blocking` with a sync
//! driver (a thread per in-flight query instead of a pool's sockets).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_channel::oneshot;
use tokio::sync::mpsc;

use super::db::{self, Db};
use super::rows;
use super::url::{DbUrl, TemplateFields};
use super::{Loaded, Lookup, NovaError, PasswordWrite, StartReport};
use crate::api::config::NovaSettings;
use crate::inventory::Inventory;
use crate::log;

/// Nova 34.0.0's `alembic_version` of the cell (main) database.
pub const SUPPORTED_MAIN_VERSIONS: &[&str] = &["ab450ba04102"];
/// Nova 34.0.0's `alembic_version` of the API database.
pub const SUPPORTED_API_VERSIONS: &[&str] = &["cdeec0c85668"];
/// Longest a load or a password write may take before it is a 500.
pub const DB_TIMEOUT: Duration = Duration::from_secs(15);
/// Cached instances kept at most; past it, expired entries are dropped
/// (and, if that is not enough, all of them).
pub const MAX_CACHED_INSTANCES: usize = 100_000;

type LoadReply = oneshot::Sender<Result<Lookup, NovaError>>;

enum Job {
    Load {
        uuid: String,
        reply: LoadReply,
    },
    SetPassword {
        uuid: String,
        password: String,
        reply: oneshot::Sender<Result<PasswordWrite, NovaError>>,
    },
}

/// The loops' handle: cheap to clone, `Send`.
#[derive(Clone, Debug)]
pub struct NovaClient {
    tx: mpsc::UnboundedSender<Job>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Job")
    }
}

impl NovaClient {
    /// The instance `uuid`, from the cache or the database.
    ///
    /// # Errors
    /// [`NovaError`]: the database failed, a row is malformed, or the
    /// thread stopped.
    pub async fn load(&self, uuid: &str) -> Result<Lookup, NovaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::Load {
                uuid: uuid.to_owned(),
                reply,
            })
            .map_err(|_| NovaError::Gone)?;
        rx.await.map_err(|_| NovaError::Gone)?
    }

    /// Store `password` for `uuid` unless one is set.
    ///
    /// # Errors
    /// [`NovaError`]: the database failed or the thread stopped.
    pub async fn set_password(
        &self,
        uuid: &str,
        password: &str,
    ) -> Result<PasswordWrite, NovaError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Job::SetPassword {
                uuid: uuid.to_owned(),
                password: password.to_owned(),
                reply,
            })
            .map_err(|_| NovaError::Gone)?;
        rx.await.map_err(|_| NovaError::Gone)?
    }
}

/// The running database thread. Dropping it stops the thread.
pub struct NovaSource {
    client: NovaClient,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for NovaSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NovaSource").finish_non_exhaustive()
    }
}

impl NovaSource {
    /// A client for the loops.
    pub fn client(&self) -> NovaClient {
        self.client.clone()
    }

    /// Stop the thread (its in-flight queries are dropped) and wait for it.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        // Closing every sender ends the dispatcher; clients held by loops
        // that already stopped are gone too.
        let (tx, _) = mpsc::unbounded_channel();
        self.client = NovaClient { tx };
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for NovaSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Shared by the dispatcher's tasks.
struct Dbs {
    local: Db,
    local_url: String,
    api: Option<Db>,
    per_cell: bool,
    dhcp_domain: String,
    /// For templated cell URLs.
    templates: TemplateFields,
    /// Other cells' pools, by their `database_connection`.
    cells: Mutex<HashMap<String, Db>>,
}

/// Connect, check the schema versions and tables, and start the thread.
///
/// # Errors
/// A database cannot be reached, has an untested alembic version (the
/// message names it and the supported ones), or lacks a table or column.
pub fn start(
    settings: &NovaSettings,
    dhcp_domain: String,
) -> Result<(NovaSource, StartReport), String> {
    let (tx, rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let settings = settings.clone();
    let thread = std::thread::Builder::new()
        .name("api-nova-db".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(format!("cannot start the database runtime: {e}")));
                    return;
                }
            };
            rt.block_on(async move {
                let dbs = match open_and_check(&settings, dhcp_domain).await {
                    Ok((dbs, report)) => {
                        let _ = ready_tx.send(Ok(report));
                        dbs
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                dispatch(Arc::new(dbs), settings.metadata_cache_expiration, rx).await;
            });
        })
        .map_err(|e| format!("cannot start the database thread: {e}"))?;
    let report = ready_rx
        .recv()
        .map_err(|_| "the database thread died at start".to_owned())??;
    Ok((
        NovaSource {
            client: NovaClient { tx },
            thread: Some(thread),
        },
        report,
    ))
}

async fn check_one(
    url: &DbUrl,
    role: &str,
    supported: &[&str],
    schema: &[(&str, &[&str])],
) -> Result<(Db, String), String> {
    let db = Db::open(url);
    let version = db::alembic_version(&db)
        .await
        .map_err(|e| format!("{role} {url}: {e}"))?;
    if !supported.contains(&version.as_str()) {
        return Err(format!(
            "{role} {url} is at Nova schema version {version}, which metaproxy has not been \
             tested with; supported: {} (Nova 34.0.0)",
            supported.join(", ")
        ));
    }
    db::check_schema(&db, schema)
        .await
        .map_err(|e| format!("{role} {url}: {e}"))?;
    Ok((db, version))
}

async fn open_and_check(
    s: &NovaSettings,
    dhcp_domain: String,
) -> Result<(Dbs, StartReport), String> {
    let mut report = StartReport {
        versions: Vec::new(),
        instances: Vec::new(),
    };
    let (local, v) = check_one(
        &s.connection,
        "api.nova.connection",
        SUPPORTED_MAIN_VERSIONS,
        db::CELL_SCHEMA,
    )
    .await?;
    report.versions.push((s.connection.redacted(), v));
    let n = db::count_instances(&local)
        .await
        .map_err(|e| format!("api.nova.connection {}: {e}", s.connection))?;
    report.instances.push((s.connection.redacted(), n));
    let mut cells = HashMap::new();
    let api = match &s.api_connection {
        None => None,
        Some(url) => {
            let (api, v) = check_one(
                url,
                "api.nova.api_connection",
                SUPPORTED_API_VERSIONS,
                db::API_SCHEMA,
            )
            .await?;
            report.versions.push((url.redacted(), v));
            if !s.local_metadata_per_cell {
                // Every cell the API database names must be readable now,
                // not at a guest's first request.
                for (name, conn) in db::cells(&api)
                    .await
                    .map_err(|e| format!("api.nova.api_connection {url}: {e}"))?
                {
                    let parsed =
                        cell_url(&conn, &s.templates).map_err(|e| format!("cell {name:?}: {e}"))?;
                    if parsed == s.connection {
                        continue;
                    }
                    let role = format!("cell {name:?}");
                    let (db, v) =
                        check_one(&parsed, &role, SUPPORTED_MAIN_VERSIONS, db::CELL_SCHEMA).await?;
                    let n = db::count_instances(&db)
                        .await
                        .map_err(|e| format!("{role} {parsed}: {e}"))?;
                    report.versions.push((parsed.redacted(), v));
                    report.instances.push((parsed.redacted(), n));
                    cells.insert(conn, db);
                }
            }
            Some(api)
        }
    };
    Ok((
        Dbs {
            local,
            local_url: s.connection.redacted(),
            api,
            per_cell: s.local_metadata_per_cell,
            dhcp_domain,
            templates: s.templates.clone(),
            cells: Mutex::new(cells),
        },
        report,
    ))
}

/// A `cell_mappings.database_connection`, filled first when it is a
/// template (`{username}`, `{password}`, `{hostname}`, … from
/// `[database] connection`, as Nova's `CellMapping.format_db_url`).
fn cell_url(conn: &str, templates: &TemplateFields) -> Result<DbUrl, String> {
    if conn.contains(['{', '}']) {
        let filled = templates.fill(conn).map_err(|e| e.to_string())?;
        return DbUrl::parse(&filled).map_err(|e| format!("templated database_connection: {e}"));
    }
    DbUrl::parse(conn).map_err(|e| e.to_string())
}

/// The database holding `uuid`: `Ok(None)` when its mapping names no cell yet.
async fn cell_for(dbs: &Dbs, uuid: &str) -> Result<Option<Db>, NovaError> {
    let Some(api) = dbs.api.as_ref().filter(|_| !dbs.per_cell) else {
        return Ok(Some(dbs.local.clone()));
    };
    let mapping = db::cell_of(api, uuid)
        .await
        .map_err(|e| NovaError::Db(e.to_string()))?;
    let conn = match mapping {
        // Nova: "Instance mapping for … not found; cell setup is incomplete",
        // then the local database.
        None => {
            log::warn(format_args!(
                "instance mapping for {uuid} not found; reading {}",
                dbs.local_url
            ));
            return Ok(Some(dbs.local.clone()));
        }
        Some(None) => return Ok(None),
        Some(Some(conn)) => conn,
    };
    let mut cells = dbs.cells.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(db) = cells.get(&conn) {
        return Ok(Some(db.clone()));
    }
    let url = cell_url(&conn, &dbs.templates).map_err(NovaError::Db)?;
    // A cell added after start-up (its schema was not checked at start;
    // a missing column then fails that cell's requests, named in the log).
    let db = Db::open(&url);
    cells.insert(conn, db.clone());
    Ok(Some(db))
}

async fn load(dbs: &Dbs, uuid: &str) -> Result<Lookup, NovaError> {
    let Some(db) = cell_for(dbs, uuid).await? else {
        return Ok(Lookup::NotFound);
    };
    let Some(rows) = db::read_instance(&db, uuid)
        .await
        .map_err(|e| NovaError::Db(e.to_string()))?
    else {
        return Ok(Lookup::NotFound);
    };
    let d = rows::decode(&rows).map_err(|e| NovaError::Corrupt(e.to_string()))?;
    Ok(Lookup::Found(Arc::new(Loaded {
        inventory: Inventory::of_one(dbs.dhcp_domain.clone(), d.networks, d.instance),
        password: d.password,
    })))
}

async fn set_password(dbs: &Dbs, uuid: &str, password: &str) -> Result<PasswordWrite, NovaError> {
    let Some(db) = cell_for(dbs, uuid).await? else {
        return Ok(PasswordWrite::NoInstance);
    };
    db::set_password_once(&db, uuid, password)
        .await
        .map_err(|e| NovaError::Db(e.to_string()))
}

enum Entry {
    Ready {
        at: Instant,
        value: Arc<Loaded>,
    },
    Pending {
        waiters: Vec<LoadReply>,
        stale: bool,
    },
}

/// What the dispatcher's tasks hand back.
enum Done {
    Loaded {
        uuid: String,
        result: Result<Lookup, NovaError>,
    },
    Password {
        uuid: String,
        result: Result<PasswordWrite, NovaError>,
        reply: oneshot::Sender<Result<PasswordWrite, NovaError>>,
    },
}

async fn dispatch(dbs: Arc<Dbs>, expiration: Duration, mut rx: mpsc::UnboundedReceiver<Job>) {
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Done>();
    let mut cache: HashMap<String, Entry> = HashMap::new();
    loop {
        let job = tokio::select! {
            // Ends when every client is gone: the loops stopped.
            j = rx.recv() => match j {
                Some(j) => j,
                None => break,
            },
            Some(d) = done_rx.recv() => {
                finish(&mut cache, expiration, d);
                continue;
            }
        };
        match job {
            Job::Load { uuid, reply } => match cache.get_mut(&uuid) {
                Some(Entry::Ready { at, value }) if at.elapsed() < expiration => {
                    let _ = reply.send(Ok(Lookup::Found(value.clone())));
                }
                Some(Entry::Pending { waiters, .. }) => waiters.push(reply),
                _ => {
                    if cache.len() >= MAX_CACHED_INSTANCES {
                        cache.retain(|_, e| match e {
                            Entry::Ready { at, .. } => at.elapsed() < expiration,
                            Entry::Pending { .. } => true,
                        });
                        if cache.len() >= MAX_CACHED_INSTANCES {
                            cache.retain(|_, e| matches!(e, Entry::Pending { .. }));
                        }
                    }
                    cache.insert(
                        uuid.clone(),
                        Entry::Pending {
                            waiters: vec![reply],
                            stale: false,
                        },
                    );
                    let (dbs, done) = (dbs.clone(), done_tx.clone());
                    tokio::spawn(async move {
                        let result = match tokio::time::timeout(DB_TIMEOUT, load(&dbs, &uuid)).await
                        {
                            Ok(r) => r,
                            Err(_) => Err(NovaError::Db(format!(
                                "reading instance {uuid} took longer than {DB_TIMEOUT:?}"
                            ))),
                        };
                        let _ = done.send(Done::Loaded { uuid, result });
                    });
                }
            },
            Job::SetPassword {
                uuid,
                password,
                reply,
            } => {
                let (dbs, done) = (dbs.clone(), done_tx.clone());
                tokio::spawn(async move {
                    let result = match tokio::time::timeout(
                        DB_TIMEOUT,
                        set_password(&dbs, &uuid, &password),
                    )
                    .await
                    {
                        Ok(r) => r,
                        Err(_) => Err(NovaError::Db(format!(
                            "storing the password of {uuid} took longer than {DB_TIMEOUT:?}"
                        ))),
                    };
                    let _ = done.send(Done::Password {
                        uuid,
                        result,
                        reply,
                    });
                });
            }
        }
    }
}

/// A task's result: answer the waiters, cache what may be cached.
fn finish(cache: &mut HashMap<String, Entry>, expiration: Duration, done: Done) {
    match done {
        Done::Loaded { uuid, result } => {
            let Some(Entry::Pending { waiters, stale }) = cache.remove(&uuid) else {
                return;
            };
            for w in waiters {
                let _ = w.send(result.clone());
            }
            if let (Ok(Lookup::Found(value)), false, false) = (&result, stale, expiration.is_zero())
            {
                cache.insert(
                    uuid,
                    Entry::Ready {
                        at: Instant::now(),
                        value: value.clone(),
                    },
                );
            }
        }
        Done::Password {
            uuid,
            result,
            reply,
        } => {
            // Drop the cached copy before answering: a GET the client sends
            // after this answer reads the database again. A read in flight
            // may predate the write: it answers its waiters but is not kept.
            match cache.get_mut(&uuid) {
                Some(Entry::Pending { stale, .. }) => *stale = true,
                Some(Entry::Ready { .. }) => {
                    cache.remove(&uuid);
                }
                None => {}
            }
            let _ = reply.send(result);
        }
    }
}
