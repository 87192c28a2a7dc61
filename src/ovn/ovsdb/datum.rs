//! OVSDB values (RFC 7047 section 5.1) and the diffs of `update2`/`update3`
//! (`ovsdb-server(7)` section 4.1.14), applied to rows kept in memory.
//!
//! A [`Datum`] is kept sorted (sets by atom, maps by key), as ovsdb-server
//! orders them, so "the first element" of a set means what it means to the
//! Python IDL, and two replicas of the same row compare equal. Whether a
//! column is a scalar, a set or a map decides how a `modify` applies, and
//! the wire cannot tell (a one-element set is sent as a bare atom), so every
//! decode goes through the column's [`ColumnType`] from `get_schema`.
//!
//! Everything here is untrusted input from the server: a malformed value is
//! a [`DatumError`], never a panic.

use std::cmp::Ordering;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

use serde_json::{json, Value};

/// A value that does not fit the column's type.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0}")]
pub struct DatumError(pub String);

fn bad(what: impl fmt::Display) -> DatumError {
    DatumError(what.to_string())
}

/// A 128-bit UUID, printed in the usual 8-4-4-4-12 form.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Uuid(pub u128);

impl Uuid {
    /// The all-zero UUID (the "no transaction" id of `monitor_cond_since`).
    pub const ZERO: Uuid = Uuid(0);

    /// Parse the 36-character form.
    pub fn parse(s: &str) -> Option<Uuid> {
        let b = s.as_bytes();
        if b.len() != 36 || [8, 13, 18, 23].iter().any(|&i| b[i] != b'-') {
            return None;
        }
        let hex: String = s.chars().filter(|&c| c != '-').collect();
        if hex.len() != 32 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        u128::from_str_radix(&hex, 16).ok().map(Uuid)
    }
}

impl fmt::Display for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let h = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &h[..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..]
        )
    }
}

impl fmt::Debug for Uuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// An atomic type (RFC 7047 `<atomic-type>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtomType {
    /// `integer`
    Integer,
    /// `real`
    Real,
    /// `boolean`
    Boolean,
    /// `string`
    String,
    /// `uuid`
    Uuid,
}

/// One atom.
#[derive(Debug, Clone)]
pub enum Atom {
    /// `integer`
    Integer(i64),
    /// `real`
    Real(f64),
    /// `boolean`
    Boolean(bool),
    /// `string`
    String(String),
    /// `uuid`
    Uuid(Uuid),
}

impl Atom {
    fn rank(&self) -> u8 {
        match self {
            Atom::Integer(_) => 0,
            Atom::Real(_) => 1,
            Atom::Boolean(_) => 2,
            Atom::String(_) => 3,
            Atom::Uuid(_) => 4,
        }
    }

    /// The type's default (what ovsdb-server omits from `initial`/`insert`).
    pub fn default_of(t: AtomType) -> Atom {
        match t {
            AtomType::Integer => Atom::Integer(0),
            AtomType::Real => Atom::Real(0.0),
            AtomType::Boolean => Atom::Boolean(false),
            AtomType::String => Atom::String(String::new()),
            AtomType::Uuid => Atom::Uuid(Uuid::ZERO),
        }
    }

    /// Decode one atom of type `t`.
    ///
    /// # Errors
    /// The JSON is not an atom of that type.
    pub fn from_json(t: AtomType, v: &Value) -> Result<Atom, DatumError> {
        match (t, v) {
            (AtomType::Integer, Value::Number(n)) => n
                .as_i64()
                .map(Atom::Integer)
                .ok_or_else(|| bad(format!("not an integer: {n}"))),
            (AtomType::Real, Value::Number(n)) => n
                .as_f64()
                .map(Atom::Real)
                .ok_or_else(|| bad(format!("not a real: {n}"))),
            (AtomType::Boolean, Value::Bool(b)) => Ok(Atom::Boolean(*b)),
            (AtomType::String, Value::String(s)) => Ok(Atom::String(s.clone())),
            (AtomType::Uuid, Value::Array(a)) if a.len() == 2 && a[0] == "uuid" => a[1]
                .as_str()
                .and_then(Uuid::parse)
                .map(Atom::Uuid)
                .ok_or_else(|| bad(format!("bad uuid: {}", a[1]))),
            _ => Err(bad(format!("expected {t:?}, got {}", short(v)))),
        }
    }

    /// The wire form.
    pub fn to_json(&self) -> Value {
        match self {
            Atom::Integer(i) => json!(i),
            Atom::Real(r) => json!(r),
            Atom::Boolean(b) => json!(b),
            Atom::String(s) => json!(s),
            Atom::Uuid(u) => json!(["uuid", u.to_string()]),
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Atom::String(s) => Some(s),
            _ => None,
        }
    }

    /// The UUID, if this is one.
    pub fn as_uuid(&self) -> Option<Uuid> {
        match self {
            Atom::Uuid(u) => Some(*u),
            _ => None,
        }
    }

    /// The integer, if this is one.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Atom::Integer(i) => Some(*i),
            _ => None,
        }
    }
}

impl PartialEq for Atom {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Atom {}
impl PartialOrd for Atom {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Atom {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Atom::Integer(a), Atom::Integer(b)) => a.cmp(b),
            (Atom::Real(a), Atom::Real(b)) => a.total_cmp(b),
            (Atom::Boolean(a), Atom::Boolean(b)) => a.cmp(b),
            (Atom::String(a), Atom::String(b)) => a.cmp(b),
            (Atom::Uuid(a), Atom::Uuid(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() > 80 {
        let mut end = 80;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}...", &s[..end])
    } else {
        s
    }
}

/// What a column holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ColumnType {
    /// Exactly one atom (`min = max = 1`): a `modify` carries the new value.
    Scalar(AtomType),
    /// A set (optional values are sets of at most one): a `modify` carries
    /// the symmetric difference.
    Set(AtomType),
    /// A map: a `modify` carries added, removed and changed pairs.
    Map(AtomType, AtomType),
}

impl ColumnType {
    /// Parse a column's `"type"` from a schema.
    ///
    /// # Errors
    /// Not a type RFC 7047 defines.
    pub fn from_schema(v: &Value) -> Result<ColumnType, DatumError> {
        fn base(v: &Value) -> Result<AtomType, DatumError> {
            let name = match v {
                Value::String(s) => s.as_str(),
                Value::Object(o) => o
                    .get("type")
                    .and_then(Value::as_str)
                    .ok_or_else(|| bad("base type without \"type\""))?,
                _ => return Err(bad(format!("bad base type {}", short(v)))),
            };
            Ok(match name {
                "integer" => AtomType::Integer,
                "real" => AtomType::Real,
                "boolean" => AtomType::Boolean,
                "string" => AtomType::String,
                "uuid" => AtomType::Uuid,
                _ => return Err(bad(format!("unknown atomic type {name:?}"))),
            })
        }
        let Value::Object(o) = v else {
            return Ok(ColumnType::Scalar(base(v)?));
        };
        let key = base(o.get("key").ok_or_else(|| bad("type without \"key\""))?)?;
        let min = o.get("min").and_then(Value::as_u64).unwrap_or(1);
        let max = match o.get("max") {
            None => 1,
            Some(Value::String(s)) if s == "unlimited" => u64::MAX,
            Some(m) => m.as_u64().ok_or_else(|| bad("bad \"max\""))?,
        };
        if let Some(value) = o.get("value") {
            return Ok(ColumnType::Map(key, base(value)?));
        }
        Ok(if min == 1 && max == 1 {
            ColumnType::Scalar(key)
        } else {
            ColumnType::Set(key)
        })
    }

    /// The value of a column that was omitted (its default).
    pub fn default_datum(&self) -> Datum {
        match self {
            ColumnType::Scalar(t) => Datum::Set(vec![Atom::default_of(*t)]),
            ColumnType::Set(_) => Datum::Set(Vec::new()),
            ColumnType::Map(..) => Datum::Map(Vec::new()),
        }
    }
}

/// A column's value: a sorted set of atoms (a scalar is a set of one) or a
/// map sorted by key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Datum {
    /// Sorted, no duplicates.
    Set(Vec<Atom>),
    /// Sorted by key, no duplicate keys.
    Map(Vec<(Atom, Atom)>),
}

impl Datum {
    /// Decode a full value of a column of type `t`.
    ///
    /// # Errors
    /// The JSON does not fit the type, or a set/map repeats a key.
    pub fn from_json(t: &ColumnType, v: &Value) -> Result<Datum, DatumError> {
        match t {
            ColumnType::Scalar(a) | ColumnType::Set(a) => {
                let mut atoms = match v {
                    Value::Array(arr) if arr.len() == 2 && arr[0] == "set" => arr[1]
                        .as_array()
                        .ok_or_else(|| bad("\"set\" without an array"))?
                        .iter()
                        .map(|x| Atom::from_json(*a, x))
                        .collect::<Result<Vec<_>, _>>()?,
                    _ => vec![Atom::from_json(*a, v)?],
                };
                atoms.sort();
                let n = atoms.len();
                atoms.dedup();
                if atoms.len() != n {
                    return Err(bad("set with a duplicate element"));
                }
                if matches!(t, ColumnType::Scalar(_)) && atoms.len() != 1 {
                    return Err(bad("scalar column with other than one value"));
                }
                Ok(Datum::Set(atoms))
            }
            ColumnType::Map(k, val) => {
                let pairs = match v {
                    Value::Array(arr) if arr.len() == 2 && arr[0] == "map" => arr[1]
                        .as_array()
                        .ok_or_else(|| bad("\"map\" without an array"))?,
                    _ => return Err(bad(format!("expected a map, got {}", short(v)))),
                };
                let mut out = Vec::with_capacity(pairs.len());
                for p in pairs {
                    match p.as_array().map(Vec::as_slice) {
                        Some([pk, pv]) => {
                            out.push((Atom::from_json(*k, pk)?, Atom::from_json(*val, pv)?))
                        }
                        _ => return Err(bad("map pair is not [key, value]")),
                    }
                }
                out.sort_by(|a, b| a.0.cmp(&b.0));
                let n = out.len();
                out.dedup_by(|a, b| a.0 == b.0);
                if out.len() != n {
                    return Err(bad("map with a duplicate key"));
                }
                Ok(Datum::Map(out))
            }
        }
    }

    /// Apply the `modify` diff `diff` (already decoded against this column's
    /// type: for a scalar the new value, for a set the elements to toggle,
    /// for a map the pairs to add, remove or update).
    pub fn apply_diff(&mut self, t: &ColumnType, diff: Datum) {
        match (t, self, diff) {
            (ColumnType::Scalar(_), me, d) => *me = d,
            (ColumnType::Set(_), Datum::Set(old), Datum::Set(toggle)) => {
                let mut out = Vec::with_capacity(old.len() + toggle.len());
                let (mut i, mut j) = (0, 0);
                while i < old.len() || j < toggle.len() {
                    match (old.get(i), toggle.get(j)) {
                        (Some(a), Some(b)) => match a.cmp(b) {
                            Ordering::Less => {
                                out.push(a.clone());
                                i += 1;
                            }
                            Ordering::Greater => {
                                out.push(b.clone());
                                j += 1;
                            }
                            Ordering::Equal => {
                                i += 1;
                                j += 1;
                            }
                        },
                        (Some(a), None) => {
                            out.push(a.clone());
                            i += 1;
                        }
                        (None, Some(b)) => {
                            out.push(b.clone());
                            j += 1;
                        }
                        (None, None) => break,
                    }
                }
                *old = out;
            }
            (ColumnType::Map(..), Datum::Map(old), Datum::Map(changes)) => {
                let mut m: BTreeMap<Atom, Atom> = std::mem::take(old).into_iter().collect();
                for (k, v) in changes {
                    match m.get(&k) {
                        None => {
                            m.insert(k, v);
                        }
                        Some(cur) if *cur == v => {
                            m.remove(&k);
                        }
                        Some(_) => {
                            m.insert(k, v);
                        }
                    }
                }
                *old = m.into_iter().collect();
            }
            // Decoding against the same type cannot give another shape.
            (_, me, d) => *me = d,
        }
    }

    /// The atoms of a set (a scalar's one atom); empty for a map.
    pub fn atoms(&self) -> &[Atom] {
        match self {
            Datum::Set(a) => a,
            Datum::Map(_) => &[],
        }
    }

    /// The value for `key` in a string-keyed map.
    pub fn map_get(&self, key: &str) -> Option<&Atom> {
        match self {
            Datum::Map(m) => m
                .binary_search_by(|(k, _)| match k {
                    Atom::String(s) => s.as_str().cmp(key),
                    other => other.rank().cmp(&3),
                })
                .ok()
                .map(|i| &m[i].1),
            Datum::Set(_) => None,
        }
    }

    /// The wire form (as `transact` and `ovsdb-client` accept it).
    pub fn to_json(&self) -> Value {
        match self {
            Datum::Set(a) if a.len() == 1 => a[0].to_json(),
            Datum::Set(a) => json!(["set", a.iter().map(Atom::to_json).collect::<Vec<_>>()]),
            Datum::Map(m) => json!([
                "map",
                m.iter()
                    .map(|(k, v)| json!([k.to_json(), v.to_json()]))
                    .collect::<Vec<_>>()
            ]),
        }
    }
}

/// The columns of a monitored table we keep, with their types.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableSchema {
    /// Column name -> type.
    pub columns: BTreeMap<String, ColumnType>,
}

/// A database schema, as much of it as the replica needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schema {
    /// `"name"`.
    pub name: String,
    /// `"version"`.
    pub version: String,
    /// Table name -> columns.
    pub tables: BTreeMap<String, TableSchema>,
}

impl Schema {
    /// Parse a `get_schema` result.
    ///
    /// # Errors
    /// Not a schema object, or a column type we cannot read.
    pub fn from_json(v: &Value) -> Result<Schema, DatumError> {
        let name = v["name"]
            .as_str()
            .ok_or_else(|| bad("schema without a name"))?;
        let version = v["version"].as_str().unwrap_or_default();
        let tables = v["tables"]
            .as_object()
            .ok_or_else(|| bad("schema without tables"))?;
        let mut out = Schema {
            name: name.to_string(),
            version: version.to_string(),
            tables: BTreeMap::new(),
        };
        for (t, def) in tables {
            let cols = def["columns"]
                .as_object()
                .ok_or_else(|| bad(format!("table {t} without columns")))?;
            let mut ts = TableSchema::default();
            for (c, cdef) in cols {
                let ty = ColumnType::from_schema(&cdef["type"])
                    .map_err(|e| bad(format!("{t}.{c}: {e}")))?;
                ts.columns.insert(c.clone(), ty);
            }
            out.tables.insert(t.clone(), ts);
        }
        Ok(out)
    }

    /// Whether `table` has `column` (optional columns differ across OVN
    /// versions: `Port_Binding.additional_chassis` since 22.06,
    /// `Datapath_Binding.nb_uuid` since 25.09).
    pub fn has_column(&self, table: &str, column: &str) -> bool {
        self.tables
            .get(table)
            .is_some_and(|t| t.columns.contains_key(column))
    }
}

/// One row: every monitored column, defaults filled in.
pub type Row = BTreeMap<String, Datum>;

/// One table of a replica: row UUID -> row.
pub type Table = HashMap<Uuid, Row>;

/// What one row update did, for the indexes built on top.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A row appeared (`initial` or `insert`).
    Insert,
    /// A row changed.
    Modify,
    /// A row went away.
    Delete,
}

/// Apply one `<table-update2>` (or, with `v1`, an RFC 7047 `<table-update>`)
/// to `table`, whose monitored columns and types are `cols`. Returns the
/// affected rows with what happened and the row before the change.
///
/// # Errors
/// Malformed updates, values that do not fit the schema, and a `modify` or
/// `delete` of a row we do not have (the replica is then out of step and
/// must be rebuilt from a full snapshot).
pub fn apply_table_update(
    table: &mut Table,
    cols: &BTreeMap<String, ColumnType>,
    update: &Value,
    v1: bool,
) -> Result<Vec<(Uuid, Change, Option<Row>)>, DatumError> {
    let rows = update
        .as_object()
        .ok_or_else(|| bad("table update is not an object"))?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, ru) in rows {
        let uuid = Uuid::parse(id).ok_or_else(|| bad(format!("bad row uuid {id:?}")))?;
        let ru = ru
            .as_object()
            .ok_or_else(|| bad("row update is not an object"))?;
        let full = |row: &Value, base: Option<&Row>| -> Result<Row, DatumError> {
            let obj = row.as_object().ok_or_else(|| bad("row is not an object"))?;
            let mut r: Row = match base {
                Some(b) => b.clone(),
                None => cols
                    .iter()
                    .map(|(c, t)| (c.clone(), t.default_datum()))
                    .collect(),
            };
            for (c, v) in obj {
                // Columns we did not ask for (none, with a "columns" list) are ignored.
                if let Some(t) = cols.get(c) {
                    r.insert(
                        c.clone(),
                        Datum::from_json(t, v).map_err(|e| bad(format!("{c}: {e}")))?,
                    );
                }
            }
            Ok(r)
        };
        if v1 {
            let old = table.get(&uuid).cloned();
            match ru.get("new") {
                Some(new) => {
                    let row = full(new, old.as_ref())?;
                    let change = if old.is_some() {
                        Change::Modify
                    } else {
                        Change::Insert
                    };
                    table.insert(uuid, row);
                    out.push((uuid, change, old));
                }
                None => {
                    let old = table
                        .remove(&uuid)
                        .ok_or_else(|| bad(format!("delete of unknown row {uuid}")))?;
                    out.push((uuid, Change::Delete, Some(old)));
                }
            }
            continue;
        }
        let (kind, body) = ru.iter().next().ok_or_else(|| bad("empty row update"))?;
        if ru.len() != 1 {
            return Err(bad("row update with more than one member"));
        }
        match kind.as_str() {
            "initial" | "insert" => {
                let row = full(body, None)?;
                let old = table.insert(uuid, row);
                out.push((uuid, Change::Insert, old));
            }
            "delete" => {
                let old = table
                    .remove(&uuid)
                    .ok_or_else(|| bad(format!("delete of unknown row {uuid}")))?;
                out.push((uuid, Change::Delete, Some(old)));
            }
            "modify" => {
                let row = table
                    .get_mut(&uuid)
                    .ok_or_else(|| bad(format!("modify of unknown row {uuid}")))?;
                let old = row.clone();
                let obj = body
                    .as_object()
                    .ok_or_else(|| bad("modify is not an object"))?;
                for (c, v) in obj {
                    let Some(t) = cols.get(c) else { continue };
                    let diff = Datum::from_json(t, v).map_err(|e| bad(format!("{c}: {e}")))?;
                    let cur = row.entry(c.clone()).or_insert_with(|| t.default_datum());
                    cur.apply_diff(t, diff);
                }
                out.push((uuid, Change::Modify, Some(old)));
            }
            other => return Err(bad(format!("unknown row update {other:?}"))),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Atom {
        Atom::String(x.into())
    }

    #[test]
    fn uuid_round_trip() {
        let t = "0123abcd-4567-89ef-0123-456789abcdef";
        assert_eq!(Uuid::parse(t).unwrap().to_string(), t);
        assert_eq!(Uuid::parse("0123abcd-4567-89ef-0123-456789abcdeg"), None);
        assert_eq!(Uuid::parse("0123abcd04567-89ef-0123-456789abcdef"), None);
    }

    #[test]
    fn schema_types() {
        let t = |v: Value| ColumnType::from_schema(&v).unwrap();
        assert_eq!(t(json!("string")), ColumnType::Scalar(AtomType::String));
        assert_eq!(
            t(json!({"key": {"type": "uuid", "refTable": "Chassis"}, "min": 0, "max": 1})),
            ColumnType::Set(AtomType::Uuid)
        );
        assert_eq!(
            t(json!({"key": "string", "min": 0, "max": "unlimited"})),
            ColumnType::Set(AtomType::String)
        );
        assert_eq!(
            t(json!({"key": "string", "value": "string", "min": 0, "max": "unlimited"})),
            ColumnType::Map(AtomType::String, AtomType::String)
        );
        assert_eq!(
            t(json!({"key": {"type": "integer", "minInteger": 1}})),
            ColumnType::Scalar(AtomType::Integer)
        );
    }

    #[test]
    fn bare_atom_is_a_one_element_set() {
        let t = ColumnType::Set(AtomType::String);
        assert_eq!(
            Datum::from_json(&t, &json!("a")).unwrap(),
            Datum::Set(vec![s("a")])
        );
        assert_eq!(
            Datum::from_json(&t, &json!(["set", ["b", "a"]])).unwrap(),
            Datum::Set(vec![s("a"), s("b")])
        );
        assert!(Datum::from_json(&t, &json!(["set", ["a", "a"]])).is_err());
        assert!(Datum::from_json(&t, &json!(7)).is_err());
    }

    #[test]
    fn set_diff_is_a_symmetric_difference() {
        let t = ColumnType::Set(AtomType::String);
        let mut d = Datum::from_json(&t, &json!(["set", ["a", "b", "c"]])).unwrap();
        d.apply_diff(
            &t,
            Datum::from_json(&t, &json!(["set", ["b", "d"]])).unwrap(),
        );
        assert_eq!(d, Datum::Set(vec![s("a"), s("c"), s("d")]));
        // An optional reference changing from one row to another: both toggle.
        let t = ColumnType::Set(AtomType::Uuid);
        let u1 = Uuid(1);
        let u2 = Uuid(2);
        let mut d = Datum::Set(vec![Atom::Uuid(u1)]);
        d.apply_diff(&t, Datum::Set(vec![Atom::Uuid(u1), Atom::Uuid(u2)]));
        assert_eq!(d, Datum::Set(vec![Atom::Uuid(u2)]));
    }

    #[test]
    fn map_diff_adds_removes_and_updates() {
        let t = ColumnType::Map(AtomType::String, AtomType::String);
        let mut d =
            Datum::from_json(&t, &json!(["map", [["a", "1"], ["b", "2"], ["c", "3"]]])).unwrap();
        let diff =
            Datum::from_json(&t, &json!(["map", [["a", "1"], ["b", "9"], ["z", "0"]]])).unwrap();
        d.apply_diff(&t, diff);
        assert_eq!(
            d,
            Datum::Map(vec![(s("b"), s("9")), (s("c"), s("3")), (s("z"), s("0"))])
        );
        assert_eq!(d.map_get("c"), Some(&s("3")));
        assert_eq!(d.map_get("a"), None);
    }

    #[test]
    fn omitted_columns_take_defaults_and_modify_of_unknown_row_is_an_error() {
        let mut cols = BTreeMap::new();
        cols.insert("name".to_string(), ColumnType::Scalar(AtomType::String));
        cols.insert("n".to_string(), ColumnType::Scalar(AtomType::Integer));
        cols.insert("mac".to_string(), ColumnType::Set(AtomType::String));
        let mut table = Table::new();
        let id = "00000000-0000-0000-0000-000000000001";
        apply_table_update(
            &mut table,
            &cols,
            &json!({id: {"initial": {"name": "x"}}}),
            false,
        )
        .unwrap();
        let row = &table[&Uuid(1)];
        assert_eq!(row["n"], Datum::Set(vec![Atom::Integer(0)]));
        assert_eq!(row["mac"], Datum::Set(vec![]));
        apply_table_update(
            &mut table,
            &cols,
            &json!({id: {"modify": {"n": 5, "mac": "m"}}}),
            false,
        )
        .unwrap();
        assert_eq!(table[&Uuid(1)]["n"], Datum::Set(vec![Atom::Integer(5)]));
        assert_eq!(table[&Uuid(1)]["mac"], Datum::Set(vec![s("m")]));
        let other = "00000000-0000-0000-0000-000000000002";
        assert!(apply_table_update(
            &mut table,
            &cols,
            &json!({other: {"modify": {"n": 1}}}),
            false
        )
        .is_err());
        assert!(
            apply_table_update(&mut table, &cols, &json!({other: {"delete": null}}), false)
                .is_err()
        );
        assert!(apply_table_update(
            &mut table,
            &cols,
            &json!({id: {"modify": {"n": "x"}}}),
            false
        )
        .is_err());
        apply_table_update(&mut table, &cols, &json!({id: {"delete": null}}), false).unwrap();
        assert!(table.is_empty());
    }
}
