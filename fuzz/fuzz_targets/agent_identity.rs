//! The agent's identity parsing over arbitrary header sets: never a panic,
//! and a parsed identity always has exactly one scope and one lookup key.
#![no_main]

use libfuzzer_sys::fuzz_target;
use smallvec::SmallVec;

const NAMES: [&str; 4] = [
    "x-forwarded-for",
    "x-neutron-router-id",
    "x-neutron-network-id",
    "x-ovn-network-id",
];

fuzz_target!(|data: &[u8]| {
    // Records: <name index byte> <value bytes up to 0xff>.
    let mut headers: Vec<(&str, &[u8])> = Vec::new();
    for rec in data.split(|&b| b == 0xff) {
        if let Some((&n, v)) = rec.split_first() {
            headers.push((NAMES[usize::from(n) % NAMES.len()], v));
        }
    }
    let get = |name: &str| -> SmallVec<[&[u8]; 2]> {
        headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
            .collect()
    };
    if let Ok(id) = metaproxy::agent::identity::parse_identity(get) {
        assert_eq!(get("x-forwarded-for").len(), 1);
        assert!(!id.scope.id().is_empty());
    }
});
