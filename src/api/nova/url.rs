//! oslo.db connection URLs, as nova.conf writes them
//! (`[database] connection`, `[api_database] connection`,
//! `cell_mappings.database_connection`), parsed into what the drivers need.
//!
//! SQLAlchemy's syntax: `dialect[+driver]://[user[:password]@]host[:port]/database[?k=v&…]`,
//! user and password percent-encoded; `sqlite:////abs/path` (four slashes:
//! an absolute path) or `sqlite:///rel/path`. The Python driver named after
//! `+` (`pymysql`, `mysqldb`, `mysqlconnector`, `pysqlite`) does not matter
//! to us: it only picks Nova's client library.
//!
//! The password is a secret: [`DbUrl`]'s `Debug` and `Display` print
//! `***` in its place, and nothing else in this module formats it.
//!
//! Rejected: the `url` crate. It does not know SQLAlchemy's `sqlite:///`
//! forms and would need the same post-processing for the dialect and
//! query parameters; the grammar here is a dozen lines.

use std::fmt;
use std::path::PathBuf;

/// Which server a URL names.
#[derive(Clone, PartialEq, Eq)]
pub enum DbTarget {
    /// MySQL or MariaDB over TCP or a Unix socket.
    Mysql {
        /// Host name or address (`[…]` stripped from IPv6).
        host: String,
        /// TCP port (default 3306).
        port: u16,
        /// User name (may be empty).
        user: String,
        /// Password, percent-decoded. Never formatted.
        password: Option<String>,
        /// Database (schema) name.
        database: String,
        /// `?charset=` (default `utf8mb4`, as the driver's).
        charset: Option<String>,
        /// `?unix_socket=`: connect here instead of host:port.
        unix_socket: Option<PathBuf>,
    },
    /// A SQLite file.
    Sqlite {
        /// The file (absolute for `sqlite:////…`).
        path: PathBuf,
    },
}

/// A parsed connection URL. `Debug`/`Display` redact the password.
#[derive(Clone, PartialEq, Eq)]
pub struct DbUrl {
    /// What to connect to.
    pub target: DbTarget,
    /// Query parameters accepted but without effect here (`plugin=dbcounter`,
    /// `read_timeout=`, …), for a start-up warning.
    pub ignored: Vec<String>,
}

/// Why a URL is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://`.
    #[error(
        "not a database URL (expected mysql+pymysql://user:password@host/db or sqlite:////path)"
    )]
    NoScheme,
    /// A dialect other than mysql or sqlite.
    #[error("dialect {0:?} is not supported (mysql, mysql+pymysql or sqlite)")]
    Dialect(String),
    /// `sqlite://` with no file (an in-memory database).
    #[error("sqlite:// without a file is an in-memory database, which Nova's tables are not in")]
    SqliteMemory,
    /// Something in the authority part.
    #[error("{0}")]
    Authority(String),
    /// A query parameter we cannot honour (TLS options in this build).
    #[error("query parameter {0:?} is not supported")]
    Param(String),
    /// A bad percent escape.
    #[error("bad percent-encoding in {0}")]
    Percent(&'static str),
    /// A templated `database_connection` that cannot be filled.
    #[error("templated database_connection: {0}")]
    Template(String),
}

fn percent_decode(s: &str, what: &'static str) -> Result<String, UrlError> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3).ok_or(UrlError::Percent(what))?;
            let v = u8::from_str_radix(hex, 16).map_err(|_| UrlError::Percent(what))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| UrlError::Percent(what))
}

/// Query parameters that PyMySQL/oslo.db accept and that have no meaning
/// (or no effect we need) here.
const IGNORED_PARAMS: [&str; 6] = [
    "plugin",
    "read_timeout",
    "write_timeout",
    "connect_timeout",
    "binary_prefix",
    "autocommit",
];

impl DbUrl {
    /// Parse an oslo.db URL.
    ///
    /// # Errors
    /// [`UrlError`] saying what is wrong; the message never contains the
    /// password.
    pub fn parse(s: &str) -> Result<DbUrl, UrlError> {
        let s = s.trim();
        let (scheme, rest) = s.split_once("://").ok_or(UrlError::NoScheme)?;
        let dialect = scheme.split('+').next().unwrap_or("");
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let mut ignored = Vec::new();
        let mut charset = None;
        let mut unix_socket = None;
        for kv in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let v = percent_decode(v, "a query parameter")?;
            match k {
                "charset" => charset = Some(v),
                "unix_socket" => unix_socket = Some(PathBuf::from(v)),
                k if IGNORED_PARAMS.contains(&k) => ignored.push(k.to_owned()),
                k if k.starts_with("ssl") => return Err(UrlError::Param(k.to_owned())),
                k => ignored.push(k.to_owned()),
            }
        }
        match dialect {
            "sqlite" => {
                // sqlite:///rel, sqlite:////abs: the authority is empty.
                let path = rest.strip_prefix('/').unwrap_or(rest);
                if path.is_empty() {
                    return Err(UrlError::SqliteMemory);
                }
                Ok(DbUrl {
                    target: DbTarget::Sqlite {
                        path: PathBuf::from(percent_decode(path, "the path")?),
                    },
                    ignored,
                })
            }
            "mysql" | "mariadb" => {
                let (authority, database) = rest.split_once('/').unwrap_or((rest, ""));
                // The password may contain '@' only percent-encoded; split at the last one.
                let (userinfo, hostport) = match authority.rsplit_once('@') {
                    Some((u, h)) => (Some(u), h),
                    None => (None, authority),
                };
                let (user, password) = match userinfo {
                    None => (String::new(), None),
                    Some(u) => match u.split_once(':') {
                        Some((u, p)) => (
                            percent_decode(u, "the user name")?,
                            Some(percent_decode(p, "the password")?),
                        ),
                        None => (percent_decode(u, "the user name")?, None),
                    },
                };
                let (host, port) = split_host_port(hostport)?;
                if host.is_empty() && unix_socket.is_none() {
                    return Err(UrlError::Authority("no host (and no ?unix_socket=)".into()));
                }
                if database.is_empty() {
                    return Err(UrlError::Authority(
                        "no database name after the host".into(),
                    ));
                }
                Ok(DbUrl {
                    target: DbTarget::Mysql {
                        host,
                        port,
                        user,
                        password,
                        database: percent_decode(database, "the database name")?,
                        charset,
                        unix_socket,
                    },
                    ignored,
                })
            }
            other => Err(UrlError::Dialect(other.to_owned())),
        }
    }

    /// A short description for logs: `mysql://nova:***@db:3306/nova` or `sqlite:////path`.
    pub fn redacted(&self) -> String {
        self.to_string()
    }
}

fn split_host_port(hp: &str) -> Result<(String, u16), UrlError> {
    const DEFAULT_PORT: u16 = 3306;
    let bad_port = |p: &str| UrlError::Authority(format!("port {p:?} is not a number 1-65535"));
    if let Some(v6) = hp.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| UrlError::Authority("unterminated [ in the host".into()))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p
                .parse()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad_port(p))?,
            None if after.is_empty() => DEFAULT_PORT,
            None => return Err(UrlError::Authority(format!("{after:?} after the host"))),
        };
        return Ok((host.to_owned(), port));
    }
    match hp.rsplit_once(':') {
        Some((h, p)) => {
            let port = p
                .parse()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad_port(p))?;
            Ok((h.to_owned(), port))
        }
        None => Ok((hp.to_owned(), DEFAULT_PORT)),
    }
}

/// What Nova fills into a templated `cell_mappings.database_connection`
/// (`CellMapping.format_db_url` → `_format_url`): the parts of
/// `[database] connection` as Python's `urllib.parse.urlparse` gives them,
/// raw (not percent-decoded; the filled URL is decoded when it is parsed),
/// the host lower-cased, `path` without its leading `/`. `Debug` redacts
/// the password.
///
/// A template such as
/// `mysql+pymysql://{username}:{password}@{hostname}/nova_cell1` lets
/// `nova-manage cell_v2 create_cell` store no credentials in the API
/// database; every service fills in its own.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct TemplateFields {
    scheme: String,
    username: Option<String>,
    password: Option<String>,
    hostname: Option<String>,
    port: Option<String>,
    path: String,
    query: String,
    fragment: String,
}

impl fmt::Debug for TemplateFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TemplateFields")
            .field("scheme", &self.scheme)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("hostname", &self.hostname)
            .field("port", &self.port)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl TemplateFields {
    /// Split `raw` (nova.conf's `[database] connection`) as `urlparse` does.
    ///
    /// # Errors
    /// A port that is not a number 0-65535: `urlparse(...).port` raises
    /// there (Nova then logs the exception and leaves the template unfilled,
    /// so that cell cannot be read).
    pub fn of(raw: &str) -> Result<TemplateFields, UrlError> {
        let raw = raw.trim();
        // urlsplit: a scheme is letters, digits, `+-.` before the first ':'.
        let (scheme, rest) = match raw.split_once(':') {
            Some((s, r))
                if s.starts_with(|c: char| c.is_ascii_alphabetic())
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) =>
            {
                (s.to_ascii_lowercase(), r)
            }
            _ => (String::new(), raw),
        };
        let (netloc, rest) = match rest.strip_prefix("//") {
            Some(r) => {
                let end = r.find(['/', '?', '#']).unwrap_or(r.len());
                (&r[..end], &r[end..])
            }
            None => ("", rest),
        };
        let (rest, fragment) = rest.split_once('#').unwrap_or((rest, ""));
        let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
        // urlparse (not urlsplit) also cuts `;params` off the last segment.
        let last = path.rfind('/').map_or(0, |i| i + 1);
        let path = match path[last..].find(';') {
            Some(i) => &path[..last + i],
            None => path,
        };
        let (userinfo, hostinfo) = match netloc.rsplit_once('@') {
            Some((u, h)) => (Some(u), h),
            None => (None, netloc),
        };
        let (username, password) = match userinfo {
            None => (None, None),
            Some(u) => match u.split_once(':') {
                Some((u, p)) => (Some(u.to_owned()), Some(p.to_owned())),
                None => (Some(u.to_owned()), None),
            },
        };
        let (host, port) = match hostinfo.strip_prefix('[') {
            Some(v6) => {
                let (h, after) = v6.split_once(']').unwrap_or((v6, ""));
                (h, after.split_once(':').map_or("", |(_, p)| p))
            }
            None => hostinfo.split_once(':').unwrap_or((hostinfo, "")),
        };
        let port = if port.is_empty() {
            None
        } else {
            match port.parse::<u32>() {
                Ok(p) if port.bytes().all(|b| b.is_ascii_digit()) && p <= 65535 => {
                    Some(p.to_string())
                }
                _ => {
                    return Err(UrlError::Authority(
                        "the port of [database] connection is not a number 0-65535".into(),
                    ))
                }
            }
        };
        let hostname = (!host.is_empty()).then(|| match host.split_once('%') {
            Some((h, zone)) => format!("{}%{zone}", h.to_lowercase()),
            None => host.to_lowercase(),
        });
        Ok(TemplateFields {
            scheme,
            username,
            password,
            hostname,
            port,
            path: path.trim_start_matches('/').to_owned(),
            query: query.to_owned(),
            fragment: fragment.to_owned(),
        })
    }

    /// Fill `template` as Python's `str.format(**fields)` does: `{name}` is
    /// replaced (an absent value prints `None`, as Python's `str(None)`),
    /// `{{` and `}}` are literal braces. Format specs, conversions,
    /// positional or indexed fields are refused.
    ///
    /// # Errors
    /// An unknown or unsupported field, or an unbalanced brace. The message
    /// gives the byte offset, never the text: a literal password in the
    /// template may contain braces.
    pub fn fill(&self, template: &str) -> Result<String, UrlError> {
        let mut out = String::with_capacity(template.len() + 64);
        let mut rest = template;
        let mut at = 0;
        while let Some(i) = rest.find(['{', '}']) {
            out.push_str(&rest[..i]);
            let tail = &rest[i..];
            let (piece, used) = if tail.starts_with("{{") {
                ("{".to_owned(), 2)
            } else if tail.starts_with("}}") {
                ("}".to_owned(), 2)
            } else if tail.starts_with('}') {
                return Err(UrlError::Template(format!(
                    "a single '}}' at byte {}",
                    at + i
                )));
            } else {
                let close = tail.find('}').ok_or_else(|| {
                    UrlError::Template(format!("an unclosed '{{' at byte {}", at + i))
                })?;
                let value = match &tail[1..close] {
                    "scheme" => Some(self.scheme.as_str()),
                    "username" => self.username.as_deref(),
                    "password" => self.password.as_deref(),
                    "hostname" => self.hostname.as_deref(),
                    "port" => self.port.as_deref(),
                    "path" => Some(self.path.as_str()),
                    "query" => Some(self.query.as_str()),
                    "fragment" => Some(self.fragment.as_str()),
                    _ => {
                        return Err(UrlError::Template(format!(
                            "the field at byte {} is not one Nova fills \
                             (scheme, username, password, hostname, port, path, query, fragment)",
                            at + i
                        )))
                    }
                };
                (value.unwrap_or("None").to_owned(), close + 1)
            };
            out.push_str(&piece);
            rest = &tail[used..];
            at += i + used;
        }
        out.push_str(rest);
        Ok(out)
    }
}

impl fmt::Display for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.target {
            DbTarget::Sqlite { path } => write!(f, "sqlite:///{}", path.display()),
            DbTarget::Mysql {
                host,
                port,
                user,
                password,
                database,
                unix_socket,
                ..
            } => {
                let pw = if password.is_some() { ":***" } else { "" };
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host.clone()
                };
                write!(f, "mysql://{user}{pw}@{host}:{port}/{database}")?;
                if let Some(s) = unix_socket {
                    write!(f, "?unix_socket={}", s.display())?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for DbUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DbUrl({self})")
    }
}

impl fmt::Debug for DbTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let u = DbUrl {
            target: self.clone(),
            ignored: Vec::new(),
        };
        write!(f, "{u}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Expected values are what Python 3.11's `urlparse` + `str.format`
    /// (Nova's `CellMapping._format_url`) give for the same strings.
    #[test]
    fn templates_are_filled_as_nova_fills_them() {
        let f = TemplateFields::of(
            "mysql+pymysql://nova:s3cr%40t@DB.Example:3307/nova?charset=utf8#frag",
        )
        .unwrap();
        assert_eq!(
            f.fill("{scheme}://{username}:{password}@{hostname}:{port}/{path}_cell1?{query}#{fragment}")
                .unwrap(),
            "mysql+pymysql://nova:s3cr%40t@db.example:3307/nova_cell1?charset=utf8#frag"
        );
        // No port: Python's str(None).
        let f = TemplateFields::of("mysql+pymysql://nova@db/nova").unwrap();
        assert_eq!(
            f.fill("mysql://{username}@{hostname}:{port}/c1").unwrap(),
            "mysql://nova@db:None/c1"
        );
        assert_eq!(
            f.fill("mysql://{password}@h/c").unwrap(),
            "mysql://None@h/c"
        );
        let f = TemplateFields::of("sqlite:////var/lib/nova/nova.sqlite").unwrap();
        assert_eq!(
            f.fill("{{x}}{path}").unwrap(),
            "{x}var/lib/nova/nova.sqlite"
        );
        // IPv6: brackets stripped, lower-cased up to the zone; `;params` cut.
        let f = TemplateFields::of("mysql://u:p@[FE80::1%25ETH0]:3306/nova;p=1").unwrap();
        assert_eq!(
            f.fill("mysql://{username}:{password}@[{hostname}]/c")
                .unwrap(),
            "mysql://u:p@[fe80::1%25ETH0]/c"
        );
        // A filled template parses like any URL.
        let f = TemplateFields::of("mysql+pymysql://nova:pw@db:3306/nova").unwrap();
        let url = DbUrl::parse(
            &f.fill("{scheme}://{username}:{password}@{hostname}:{port}/nova_cell2")
                .unwrap(),
        )
        .unwrap();
        assert_eq!(url.to_string(), "mysql://nova:***@db:3306/nova_cell2");
    }

    #[test]
    fn a_template_nova_cannot_fill_is_refused_without_its_text() {
        let f = TemplateFields::of("mysql+pymysql://nova:hunter2@db/nova").unwrap();
        for t in [
            "mysql://{userzq}@h/c",
            "mysql://{port:zq}@h/c",
            "mysql://{0}@h/zq",
            "mysql://{username!zq}@h/c",
            "mysql://nova:pa}zq@h/c",
            "mysql://nova:pa{zq@h/c",
        ] {
            let e = f.fill(t).unwrap_err().to_string();
            assert!(e.starts_with("templated database_connection: "), "{t}: {e}");
            assert!(!e.contains("zq") && !e.contains("hunter2"), "{t}: {e}");
        }
        assert!(TemplateFields::of("mysql://u@h:99999/nova").is_err());
        assert!(TemplateFields::of("mysql://u@h:-1/nova").is_err());
        let dbg = format!("{:?}", f);
        assert!(!dbg.contains("hunter2") && dbg.contains("***"), "{dbg}");
    }

    fn mysql(s: &str) -> DbTarget {
        DbUrl::parse(s).unwrap().target
    }

    #[test]
    fn nova_conf_mysql_urls_parse_as_pymysql_does() {
        let t = mysql("mysql+pymysql://nova:s3cr%40t@controller/nova?charset=utf8");
        assert_eq!(
            t,
            DbTarget::Mysql {
                host: "controller".into(),
                port: 3306,
                user: "nova".into(),
                password: Some("s3cr@t".into()),
                database: "nova".into(),
                charset: Some("utf8".into()),
                unix_socket: None,
            }
        );
        let DbTarget::Mysql { host, port, .. } = mysql("mysql://u:p@[fd00::5]:3307/nova_api")
        else {
            panic!()
        };
        assert_eq!((host.as_str(), port), ("fd00::5", 3307));
        let DbTarget::Mysql {
            unix_socket, host, ..
        } = mysql("mysql+pymysql://root@/nova?unix_socket=/run/mysqld/mysqld.sock")
        else {
            panic!()
        };
        assert_eq!(host, "");
        assert_eq!(unix_socket, Some(PathBuf::from("/run/mysqld/mysqld.sock")));
        // A password with ':' and a raw '@' (the last '@' ends the user info).
        let DbTarget::Mysql { user, password, .. } = mysql("mysql://nova:a:b@c@db/nova") else {
            panic!()
        };
        assert_eq!(
            (user.as_str(), password.as_deref()),
            ("nova", Some("a:b@c"))
        );
    }

    #[test]
    fn devstack_parameters_are_accepted_and_reported() {
        let u = DbUrl::parse(
            "mysql+pymysql://root:pw@127.0.0.1/nova_cell1?charset=utf8&plugin=dbcounter",
        )
        .unwrap();
        assert_eq!(u.ignored, vec!["plugin".to_owned()]);
    }

    #[test]
    fn sqlite_urls_keep_sqlalchemys_slashes() {
        assert_eq!(
            DbUrl::parse("sqlite:////var/lib/nova/nova.sqlite")
                .unwrap()
                .target,
            DbTarget::Sqlite {
                path: "/var/lib/nova/nova.sqlite".into()
            }
        );
        assert_eq!(
            DbUrl::parse("sqlite:///nova.sqlite").unwrap().target,
            DbTarget::Sqlite {
                path: "nova.sqlite".into()
            }
        );
        assert_eq!(DbUrl::parse("sqlite://"), Err(UrlError::SqliteMemory));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        assert_eq!(DbUrl::parse("nova.sqlite"), Err(UrlError::NoScheme));
        assert_eq!(
            DbUrl::parse("postgresql://u:p@h/nova"),
            Err(UrlError::Dialect("postgresql".into()))
        );
        assert!(matches!(
            DbUrl::parse("mysql://u:p@h:99999/nova"),
            Err(UrlError::Authority(_))
        ));
        assert!(matches!(
            DbUrl::parse("mysql://u:p@h"),
            Err(UrlError::Authority(_))
        ));
        assert_eq!(
            DbUrl::parse("mysql://u:p@h/nova?ssl_ca=/ca.pem"),
            Err(UrlError::Param("ssl_ca".into()))
        );
        assert_eq!(
            DbUrl::parse("mysql://u:p%zz@h/nova"),
            Err(UrlError::Percent("the password"))
        );
    }

    #[test]
    fn the_password_never_reaches_display_or_debug() {
        let u = DbUrl::parse("mysql+pymysql://nova:hunter2@db:3306/nova?charset=utf8").unwrap();
        for text in [u.to_string(), format!("{u:?}"), format!("{:?}", u.target)] {
            assert!(!text.contains("hunter2"), "{text}");
            assert!(text.contains("nova:***@db:3306/nova"), "{text}");
        }
        // Errors never quote the password either.
        let e = DbUrl::parse("mysql://nova:hunter2@db:x/nova").unwrap_err();
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}
