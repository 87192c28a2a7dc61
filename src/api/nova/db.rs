//! The SQL: Nova's tables read (and the few rows written) as Nova 34's
//! `nova.db.main.api` does, on MySQL/MariaDB or SQLite through `sqlx`.
//!
//! Every statement is plain SQL that both dialects accept (`?`
//! placeholders, `` `key` `` quoted because it is reserved in MySQL), run
//! on a [`Db`] by `with_db!`, which expands the same code once per
//! driver; the rows are decoded into the plain structs of [`super::rows`]
//! right here, so nothing above this module sees a driver type.
//!
//! Soft deletes: `deleted = 0` on every table Nova reads with
//! `read_deleted="no"`; the EC2 mappings are read with deleted rows too,
//! as Nova's `model_query(..., read_deleted="yes")` does.
//!
//! Rejected: sqlx's `Any` driver (one pool type for both): its value
//! conversions lose column types (an `INT` and a SQLite `INTEGER` decode
//! differently), and the two places that differ by dialect (the password
//! transaction's locking) need the concrete driver anyway.

use std::time::Duration;

use sqlx::mysql::{MySqlConnectOptions, MySqlPool, MySqlPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePool, SqlitePoolOptions};
use sqlx::Row as _;

use super::rows::{BdmRow, Ec2Ids, ExtraRow, InstanceRow, Rows};
use super::url::{DbTarget, DbUrl};
use super::PasswordWrite;

/// Connections per database pool.
pub const POOL_CONNECTIONS: u32 = 4;
/// How long a query waits for a pooled connection (or a new one).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// SQLite: how long a statement waits for another writer's lock (Nova's
/// own processes write the same file).
pub const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// A database pool of either driver.
#[derive(Clone, Debug)]
pub enum Db {
    /// MySQL / MariaDB.
    My(MySqlPool),
    /// SQLite.
    Lite(SqlitePool),
}

/// Run `$body` with `$p` bound to the concrete pool.
macro_rules! with_db {
    ($db:expr, $p:ident => $body:expr) => {
        match $db {
            Db::My($p) => $body,
            Db::Lite($p) => $body,
        }
    };
}

/// A database error, with what we were doing. Never carries the password
/// (sqlx's messages name the user and host at most).
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct DbError {
    /// What was being done (`reading instances`, …).
    pub what: String,
    /// The driver's error.
    #[source]
    pub source: sqlx::Error,
}

fn ctx(what: impl Into<String>) -> impl FnOnce(sqlx::Error) -> DbError {
    let what = what.into();
    move |source| DbError { what, source }
}

impl Db {
    /// A pool for `url`. Connects lazily: the first query opens the first
    /// connection (start-up runs the schema check right away).
    ///
    /// Must be called inside the driver's tokio runtime.
    pub fn open(url: &DbUrl) -> Db {
        match &url.target {
            DbTarget::Sqlite { path } => {
                let opts = SqliteConnectOptions::new()
                    .filename(path)
                    .create_if_missing(false)
                    .busy_timeout(SQLITE_BUSY_TIMEOUT);
                Db::Lite(
                    SqlitePoolOptions::new()
                        .max_connections(POOL_CONNECTIONS)
                        .acquire_timeout(ACQUIRE_TIMEOUT)
                        .connect_lazy_with(opts),
                )
            }
            DbTarget::Mysql {
                host,
                port,
                user,
                password,
                database,
                charset,
                unix_socket,
            } => {
                let mut opts = MySqlConnectOptions::new()
                    .host(host)
                    .port(*port)
                    .username(user)
                    .database(database)
                    .charset(charset.as_deref().unwrap_or("utf8mb4"));
                if let Some(p) = password {
                    opts = opts.password(p);
                }
                if let Some(s) = unix_socket {
                    opts = opts.socket(s);
                }
                Db::My(
                    MySqlPoolOptions::new()
                        .max_connections(POOL_CONNECTIONS)
                        .acquire_timeout(ACQUIRE_TIMEOUT)
                        .connect_lazy_with(opts),
                )
            }
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS.ffffff` UTC, as SQLAlchemy stores Nova's
/// `timeutils.utcnow()` (MySQL takes it for a DATETIME too).
fn utc_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs();
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let (y, m, d) = crate::api::civil_from_days(days);
    let rem = secs % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{:06}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        now.subsec_micros()
    )
}

/// The alembic revision of a database (`alembic_version.version_num`).
///
/// # Errors
/// No `alembic_version` table (not a Nova database, or one older than
/// Nova's move to alembic) or the query failed.
pub async fn alembic_version(db: &Db) -> Result<String, DbError> {
    const SQL: &str = "SELECT version_num FROM alembic_version";
    with_db!(db, p => {
        let row = sqlx::query(SQL).fetch_one(p).await.map_err(ctx("reading alembic_version"))?;
        row.try_get::<String, _>(0).map_err(ctx("reading alembic_version"))
    })
}

/// The tables and columns of the cell database we read or write.
pub const CELL_SCHEMA: &[(&str, &[&str])] = &[
    (
        "instances",
        &[
            "id",
            "uuid",
            "deleted",
            "project_id",
            "hostname",
            "display_name",
            "launch_index",
            "availability_zone",
            "reservation_id",
            "image_ref",
            "kernel_id",
            "ramdisk_id",
            "key_name",
            "user_data",
            "root_device_name",
            "default_ephemeral_device",
            "default_swap_device",
        ],
    ),
    (
        "block_device_mapping",
        &[
            "id",
            "instance_uuid",
            "deleted",
            "source_type",
            "destination_type",
            "guest_format",
            "device_name",
        ],
    ),
    (
        "instance_extra",
        &[
            "instance_uuid",
            "deleted",
            "flavor",
            "keypairs",
            "device_metadata",
            "numa_topology",
        ],
    ),
    (
        "instance_metadata",
        &["id", "instance_uuid", "deleted", "`key`", "value"],
    ),
    (
        "instance_system_metadata",
        &[
            "id",
            "instance_uuid",
            "deleted",
            "`key`",
            "value",
            "created_at",
            "updated_at",
        ],
    ),
    (
        "instance_info_caches",
        &["instance_uuid", "deleted", "network_info"],
    ),
    (
        "instance_id_mappings",
        &["id", "uuid", "created_at", "deleted"],
    ),
    ("s3_images", &["id", "uuid", "created_at", "deleted"]),
];

/// The tables and columns of the API database we read.
pub const API_SCHEMA: &[(&str, &[&str])] = &[
    ("instance_mappings", &["instance_uuid", "cell_id"]),
    ("cell_mappings", &["id", "name", "database_connection"]),
];

/// Check that every table and column of `schema` exists.
///
/// # Errors
/// The first missing table or column, named (`instance_extra.keypairs`).
pub async fn check_schema(db: &Db, schema: &[(&str, &[&str])]) -> Result<(), DbError> {
    for (table, cols) in schema {
        let all = format!("SELECT {} FROM {table} WHERE 1 = 0", cols.join(", "));
        let ok = with_db!(db, p => sqlx::query(&all).fetch_all(p).await.is_ok());
        if ok {
            continue;
        }
        // Name the first column that is missing (or the table).
        for col in *cols {
            let one = format!("SELECT {col} FROM {table} WHERE 1 = 0");
            with_db!(db, p => sqlx::query(&one).fetch_all(p).await.map(drop))
                .map_err(ctx(format!("checking {table}.{}", col.trim_matches('`'))))?;
        }
        with_db!(db, p => sqlx::query(&all).fetch_all(p).await.map(drop))
            .map_err(ctx(format!("checking {table}")))?;
    }
    Ok(())
}

/// Instances Nova would serve (not deleted).
///
/// # Errors
/// The query failed.
pub async fn count_instances(db: &Db) -> Result<i64, DbError> {
    const SQL: &str = "SELECT COUNT(*) FROM instances WHERE deleted = 0";
    with_db!(db, p => {
        let row = sqlx::query(SQL).fetch_one(p).await.map_err(ctx("counting instances"))?;
        row.try_get::<i64, _>(0).map_err(ctx("counting instances"))
    })
}

/// `cell_mappings` (name, database_connection), in id order.
///
/// # Errors
/// The query failed.
pub async fn cells(api: &Db) -> Result<Vec<(String, String)>, DbError> {
    const SQL: &str = "SELECT name, database_connection FROM cell_mappings ORDER BY id";
    with_db!(api, p => {
        let rows = sqlx::query(SQL).fetch_all(p).await.map_err(ctx("reading cell_mappings"))?;
        rows.iter()
            .map(|r| {
                Ok((
                    r.try_get::<Option<String>, _>(0)?.unwrap_or_default(),
                    r.try_get::<Option<String>, _>(1)?.unwrap_or_default(),
                ))
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(ctx("reading cell_mappings"))
    })
}

/// Where the instance lives: the `database_connection` of its cell, from
/// `instance_mappings`; `Ok(None)` without a mapping (Nova then reads the
/// local `[database]`, with a warning).
///
/// # Errors
/// The query failed.
pub async fn cell_of(api: &Db, uuid: &str) -> Result<Option<Option<String>>, DbError> {
    const SQL: &str = "SELECT cm.database_connection FROM instance_mappings im \
         LEFT JOIN cell_mappings cm ON cm.id = im.cell_id WHERE im.instance_uuid = ?";
    with_db!(api, p => {
        let row = sqlx::query(SQL)
            .bind(uuid)
            .fetch_optional(p)
            .await
            .map_err(ctx("reading instance_mappings"))?;
        row.map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()
            .map_err(ctx("reading instance_mappings"))
    })
}

/// Read every row the metadata of `uuid` needs; `Ok(None)` when there is no
/// such (non-deleted) instance. Creates the EC2 id mappings Nova creates on
/// first use. Security groups are left empty (they come from Neutron).
///
/// # Errors
/// A query failed.
pub async fn read_instance(db: &Db, uuid: &str) -> Result<Option<Rows>, DbError> {
    const INSTANCE: &str = "SELECT id, uuid, project_id, hostname, display_name, launch_index, \
         availability_zone, reservation_id, image_ref, kernel_id, ramdisk_id, key_name, user_data, \
         root_device_name, default_ephemeral_device, default_swap_device \
         FROM instances WHERE uuid = ? AND deleted = 0";
    // Nova's query has no ORDER BY; both engines return these rows in
    // primary-key order (SQLite's rowid; InnoDB's instance_uuid index
    // ends in the key), which the ephemeralN numbering depends on.
    const BDMS: &str = "SELECT source_type, destination_type, guest_format, device_name \
         FROM block_device_mapping WHERE instance_uuid = ? AND deleted = 0 ORDER BY id";
    const EXTRA: &str = "SELECT flavor, keypairs, device_metadata, numa_topology \
         FROM instance_extra WHERE instance_uuid = ? AND deleted = 0";
    const META: &str = "SELECT `key`, value FROM instance_metadata \
         WHERE instance_uuid = ? AND deleted = 0 ORDER BY id";
    const SYSMETA: &str = "SELECT `key`, value FROM instance_system_metadata \
         WHERE instance_uuid = ? AND deleted = 0 ORDER BY id";
    const CACHE: &str = "SELECT network_info FROM instance_info_caches \
         WHERE instance_uuid = ? AND deleted = 0";
    let instance = with_db!(db, p => {
        let Some(r) = sqlx::query(INSTANCE)
            .bind(uuid)
            .fetch_optional(p)
            .await
            .map_err(ctx("reading instances"))?
        else {
            return Ok(None);
        };
        (|| -> Result<InstanceRow, sqlx::Error> {
            Ok(InstanceRow {
                id: r.try_get("id")?,
                uuid: r.try_get("uuid")?,
                project_id: r.try_get("project_id")?,
                hostname: r.try_get("hostname")?,
                display_name: r.try_get("display_name")?,
                launch_index: r.try_get("launch_index")?,
                availability_zone: r.try_get("availability_zone")?,
                reservation_id: r.try_get("reservation_id")?,
                image_ref: r.try_get("image_ref")?,
                kernel_id: r.try_get("kernel_id")?,
                ramdisk_id: r.try_get("ramdisk_id")?,
                key_name: r.try_get("key_name")?,
                user_data: r.try_get("user_data")?,
                root_device_name: r.try_get("root_device_name")?,
                default_ephemeral_device: r.try_get("default_ephemeral_device")?,
                default_swap_device: r.try_get("default_swap_device")?,
            })
        })()
        .map_err(ctx("decoding instances"))?
    });
    let extra = with_db!(db, p => {
        let r = sqlx::query(EXTRA)
            .bind(uuid)
            .fetch_optional(p)
            .await
            .map_err(ctx("reading instance_extra"))?;
        r.map(|r| -> Result<ExtraRow, sqlx::Error> {
            Ok(ExtraRow {
                flavor: r.try_get("flavor")?,
                keypairs: r.try_get("keypairs")?,
                device_metadata: r.try_get("device_metadata")?,
                numa_topology: r.try_get("numa_topology")?,
            })
        })
        .transpose()
        .map_err(ctx("decoding instance_extra"))?
    });
    let metadata = key_values(db, META, uuid, "instance_metadata").await?;
    let system_metadata = key_values(db, SYSMETA, uuid, "instance_system_metadata").await?;
    let network_info = with_db!(db, p => {
        let r = sqlx::query(CACHE)
            .bind(uuid)
            .fetch_optional(p)
            .await
            .map_err(ctx("reading instance_info_caches"))?;
        r.map(|r| r.try_get::<Option<String>, _>(0))
            .transpose()
            .map_err(ctx("decoding instance_info_caches"))?
            .flatten()
    });
    let block_devices = with_db!(db, p => {
        let rows = sqlx::query(BDMS)
            .bind(uuid)
            .fetch_all(p)
            .await
            .map_err(ctx("reading block_device_mapping"))?;
        rows.iter()
            .map(|r| {
                Ok(BdmRow {
                    source_type: r.try_get("source_type")?,
                    destination_type: r.try_get("destination_type")?,
                    guest_format: r.try_get("guest_format")?,
                    device_name: r.try_get("device_name")?,
                })
            })
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(ctx("decoding block_device_mapping"))?
    });
    let image = |id: &Option<String>| id.clone().filter(|s| !s.is_empty());
    let ec2 = Ec2Ids {
        instance: ec2_mapping(db, "instance_id_mappings", uuid).await?,
        image: match image(&instance.image_ref) {
            Some(i) => Some(ec2_mapping(db, "s3_images", &i).await?),
            None => None,
        },
        kernel: match image(&instance.kernel_id) {
            Some(i) => Some(ec2_mapping(db, "s3_images", &i).await?),
            None => None,
        },
        ramdisk: match image(&instance.ramdisk_id) {
            Some(i) => Some(ec2_mapping(db, "s3_images", &i).await?),
            None => None,
        },
    };
    Ok(Some(Rows {
        instance,
        extra,
        metadata,
        system_metadata,
        network_info,
        block_devices,
        ec2,
        security_groups: Vec::new(),
    }))
}

async fn key_values(
    db: &Db,
    sql: &str,
    uuid: &str,
    table: &str,
) -> Result<Vec<(String, Option<String>)>, DbError> {
    with_db!(db, p => {
        let rows = sqlx::query(sql)
            .bind(uuid)
            .fetch_all(p)
            .await
            .map_err(ctx(format!("reading {table}")))?;
        rows.iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<Option<String>, _>(1)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(ctx(format!("decoding {table}")))
    })
}

/// The integer id of `uuid` in an EC2 mapping table (`instance_id_mappings`
/// or `s3_images`), created on first use as Nova's `ec2_instance_create` /
/// `s3_image_create` do (the table's autoincrement is the id sequence).
/// Two API nodes creating it at once leave two rows; both then read the
/// lowest id, as Nova's `.first()` does on its index.
async fn ec2_mapping(db: &Db, table: &'static str, uuid: &str) -> Result<i64, DbError> {
    let select = format!("SELECT id FROM {table} WHERE uuid = ? ORDER BY id LIMIT 1");
    let insert = format!("INSERT INTO {table} (created_at, uuid, deleted) VALUES (?, ?, 0)");
    for _ in 0..2 {
        let found = with_db!(db, p => {
            let r = sqlx::query(&select)
                .bind(uuid)
                .fetch_optional(p)
                .await
                .map_err(ctx(format!("reading {table}")))?;
            r.map(|r| r.try_get::<i64, _>(0))
                .transpose()
                .map_err(ctx(format!("decoding {table}")))?
        });
        if let Some(id) = found {
            return Ok(id);
        }
        with_db!(db, p => sqlx::query(&insert)
            .bind(utc_now())
            .bind(uuid)
            .execute(p)
            .await
            .map(drop)
            .map_err(ctx(format!("creating the {table} row")))?);
    }
    Err(DbError {
        what: format!("{table}: the row just created is not there"),
        source: sqlx::Error::RowNotFound,
    })
}

/// Nova's `password.CHUNKS` × `CHUNK_LENGTH` (characters, not bytes).
pub const PASSWORD_CHUNKS: usize = 4;
/// Characters per `password_N` value.
pub const PASSWORD_CHUNK_CHARS: usize = 255;

/// `convert_password`: `password_0..3`, 255 characters each, empty ones too.
pub fn password_chunks(password: &str) -> [String; PASSWORD_CHUNKS] {
    let chars: Vec<char> = password.chars().collect();
    std::array::from_fn(|i| {
        chars
            .iter()
            .skip(i * PASSWORD_CHUNK_CHARS)
            .take(PASSWORD_CHUNK_CHARS)
            .collect()
    })
}

/// Store `password` for `uuid` if none is set, in one transaction.
///
/// Race-free between any number of our API nodes: on MySQL/MariaDB the
/// transaction first locks the instance's `instances` row
/// (`SELECT … FOR UPDATE`), so concurrent writers queue on it and the
/// second sees the first's chunks; on SQLite it is `BEGIN IMMEDIATE`
/// (the database's one write lock, taken before reading). Nova's table
/// has no unique key on (instance_uuid, key, deleted) to lean on instead.
/// Nova's own handler checks its cached copy and does not lock, so a
/// nova-api-metadata POST racing ours can still overwrite it; that race is
/// Nova's, and exists between two Nova workers too.
///
/// # Errors
/// A statement failed; the transaction is rolled back.
pub async fn set_password_once(
    db: &Db,
    uuid: &str,
    password: &str,
) -> Result<PasswordWrite, DbError> {
    const LOCK_MY: &str = "SELECT id FROM instances WHERE uuid = ? AND deleted = 0 FOR UPDATE";
    const EXISTS: &str = "SELECT id FROM instances WHERE uuid = ? AND deleted = 0";
    // In id order: of duplicate rows of a key, the last one counts
    // (`rows::extract_password`).
    const SYSMETA: &str = "SELECT `key`, value FROM instance_system_metadata \
         WHERE instance_uuid = ? AND deleted = 0 ORDER BY id";
    // A locking read: it sees what a writer that held the lock committed.
    const SYSMETA_MY: &str = "SELECT `key`, value FROM instance_system_metadata \
         WHERE instance_uuid = ? AND deleted = 0 ORDER BY id FOR UPDATE";
    const UPDATE: &str = "UPDATE instance_system_metadata SET value = ?, updated_at = ? \
         WHERE instance_uuid = ? AND `key` = ? AND deleted = 0";
    const INSERT: &str = "INSERT INTO instance_system_metadata \
         (created_at, deleted, instance_uuid, `key`, value) VALUES (?, 0, ?, ?, ?)";
    let chunks = password_chunks(password);
    let now = utc_now();
    with_db!(db, p => {
        let mut tx = match db {
            Db::My(_) => p.begin().await,
            Db::Lite(_) => p.begin_with("BEGIN IMMEDIATE").await,
        }
        .map_err(ctx("starting the password transaction"))?;
        let lock = if matches!(db, Db::My(_)) { LOCK_MY } else { EXISTS };
        let exists = sqlx::query(lock)
            .bind(uuid)
            .fetch_optional(&mut *tx)
            .await
            .map_err(ctx("locking the instance"))?;
        if exists.is_none() {
            return Ok(PasswordWrite::NoInstance);
        }
        let sysmeta = if matches!(db, Db::My(_)) { SYSMETA_MY } else { SYSMETA };
        let rows = sqlx::query(sysmeta)
            .bind(uuid)
            .fetch_all(&mut *tx)
            .await
            .map_err(ctx("reading instance_system_metadata"))?;
        let current = rows
            .iter()
            .map(|r| Ok((r.try_get::<String, _>(0)?, r.try_get::<Option<String>, _>(1)?)))
            .collect::<Result<Vec<_>, sqlx::Error>>()
            .map_err(ctx("decoding instance_system_metadata"))?;
        if super::rows::extract_password(&current).is_some() {
            return Ok(PasswordWrite::AlreadySet);
        }
        for (i, chunk) in chunks.iter().enumerate() {
            let key = format!("password_{i}");
            let present = current.iter().any(|(k, _)| *k == key);
            let q = if present {
                sqlx::query(UPDATE).bind(chunk).bind(&now).bind(uuid).bind(&key)
            } else {
                sqlx::query(INSERT).bind(&now).bind(uuid).bind(&key).bind(chunk)
            };
            q.execute(&mut *tx)
                .await
                .map_err(ctx(format!("writing instance_system_metadata {key}")))?;
        }
        tx.commit().await.map_err(ctx("committing the password"))?;
        Ok(PasswordWrite::Stored)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_cut_in_characters_as_nova_cuts_them() {
        let c = password_chunks("abc");
        assert_eq!(
            c,
            [
                "abc".to_owned(),
                String::new(),
                String::new(),
                String::new()
            ]
        );
        // 300 two-byte characters: 255 in the first chunk, 45 in the second.
        let long = "é".repeat(300);
        let c = password_chunks(&long);
        assert_eq!(c[0].chars().count(), 255);
        assert_eq!(c[1].chars().count(), 45);
        assert_eq!(c.concat(), long);
        let max = "x".repeat(1020);
        assert!(password_chunks(&max).iter().all(|c| c.len() == 255));
    }

    #[test]
    fn timestamps_look_like_sqlalchemys() {
        let t = utc_now();
        assert_eq!(t.len(), "2026-12-02 02:47:19.771949".len(), "{t}");
        assert_eq!(&t[4..5], "-");
        assert_eq!(&t[10..11], " ");
        assert_eq!(&t[19..20], ".");
    }
}
