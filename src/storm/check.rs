//! Is this answer right, and is it *this* VM's? Pure functions over
//! (expected VM, status, body), so they are unit-tested without sockets.
//!
//! An answer that is well-formed but names another instance (uuid, EC2 id,
//! hostname, address, key, user-data) is [`ErrorKind::WrongVm`]: the one
//! failure a metadata service must never have. Anything else wrong is a
//! status or body error.

use super::stats::ErrorKind;
use super::VmSpec;

/// What a request expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Check {
    /// 200 with a non-empty body (cloud-init treats an empty 200 as failure).
    NonEmpty,
    /// 200, JSON object with this VM's `uuid` and `hostname`.
    MetaData,
    /// This VM's user-data (200), or 404 if it has none.
    UserData,
    /// 200 with valid JSON (cloud-init fails hard on invalid vendor/network JSON).
    Json,
    /// 200, JSON; every `networks[*].ip_address` present must include ours.
    NetworkData,
    /// 404 (EC2 versions Nova does not serve).
    NotFound,
    /// 200, a UTF-8 listing (the crawl reads it).
    Listing,
    /// 200 EC2 leaf; its value is checked when the key names an identity.
    Leaf(Leaf),
}

/// EC2 leaves whose value identifies the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leaf {
    InstanceId,
    Hostname,
    LocalIpv4,
    ReservationId,
    LaunchIndex,
    OpensshKey,
    Other,
}

impl Leaf {
    pub(crate) fn from_name(name: &str) -> Leaf {
        match name {
            "instance-id" => Leaf::InstanceId,
            "hostname" | "local-hostname" | "public-hostname" => Leaf::Hostname,
            "local-ipv4" => Leaf::LocalIpv4,
            "reservation-id" => Leaf::ReservationId,
            "ami-launch-index" => Leaf::LaunchIndex,
            "openssh-key" => Leaf::OpensshKey,
            _ => Leaf::Other,
        }
    }
}

/// A failed check: its kind and a short reason for the error samples.
pub(crate) type Failure = (ErrorKind, String);

fn want_status(status: u16, want: u16) -> Result<(), Failure> {
    if status == want {
        Ok(())
    } else {
        Err((
            ErrorKind::Status,
            format!("status {status}, expected {want}"),
        ))
    }
}

fn wrong(what: &str, got: &[u8], want: &str) -> Failure {
    let got = String::from_utf8_lossy(&got[..got.len().min(80)]);
    (
        ErrorKind::WrongVm,
        format!("{what} {got:?}, expected {want:?}"),
    )
}

/// `vm-1.novalocal` and `vm-1` are ours; `vm-10` is not.
fn host_matches(got: &str, hostname: &str) -> bool {
    got.strip_prefix(hostname)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

fn eq_or_wrong(what: &str, body: &[u8], want: &str) -> Result<(), Failure> {
    if body == want.as_bytes() {
        Ok(())
    } else {
        Err(wrong(what, body, want))
    }
}

fn parse_json(body: &[u8]) -> Result<serde_json::Value, Failure> {
    serde_json::from_slice(body).map_err(|e| (ErrorKind::Body, format!("invalid JSON: {e}")))
}

/// Check one answer.
pub(crate) fn check(vm: &VmSpec, check: Check, status: u16, body: &[u8]) -> Result<(), Failure> {
    match check {
        Check::NotFound => want_status(status, 404),
        Check::UserData => match &vm.user_data {
            None => want_status(status, 404),
            Some(ud) => {
                want_status(status, 200)?;
                if body == ud.as_slice() {
                    Ok(())
                } else {
                    Err(wrong("user-data", body, &String::from_utf8_lossy(ud)))
                }
            }
        },
        _ => {
            want_status(status, 200)?;
            check_ok_body(vm, check, body)
        }
    }
}

fn check_ok_body(vm: &VmSpec, check: Check, body: &[u8]) -> Result<(), Failure> {
    match check {
        Check::NonEmpty => {
            if body.iter().all(u8::is_ascii_whitespace) {
                Err((ErrorKind::Body, "empty body".to_owned()))
            } else {
                Ok(())
            }
        }
        Check::MetaData => {
            let v = parse_json(body)?;
            let uuid = v.get("uuid").and_then(|u| u.as_str());
            if uuid != Some(vm.uuid.as_str()) {
                return Err(wrong("meta_data.json uuid", body, &vm.uuid));
            }
            match v.get("hostname").and_then(|h| h.as_str()) {
                Some(h) if host_matches(h, &vm.hostname) => Ok(()),
                _ => Err(wrong("meta_data.json hostname", body, &vm.hostname)),
            }
        }
        Check::Json => parse_json(body).map(|_| ()),
        Check::NetworkData => {
            let v = parse_json(body)?;
            let ip = vm.ip.to_string();
            let addrs: Vec<&str> = v
                .get("networks")
                .and_then(|n| n.as_array())
                .map(|nets| {
                    nets.iter()
                        .filter_map(|n| n.get("ip_address").and_then(|a| a.as_str()))
                        .collect()
                })
                .unwrap_or_default();
            if addrs.is_empty() || addrs.contains(&ip.as_str()) {
                Ok(())
            } else {
                Err(wrong("network_data.json ip_address", body, &ip))
            }
        }
        Check::Listing => std::str::from_utf8(body)
            .map(|_| ())
            .map_err(|_| (ErrorKind::Body, "listing is not UTF-8".to_owned())),
        Check::Leaf(leaf) => match leaf {
            Leaf::InstanceId => eq_or_wrong("instance-id", body, &vm.instance_id),
            Leaf::Hostname => match std::str::from_utf8(body) {
                Ok(h) if host_matches(h, &vm.hostname) => Ok(()),
                _ => Err(wrong("hostname", body, &vm.hostname)),
            },
            Leaf::LocalIpv4 => eq_or_wrong("local-ipv4", body, &vm.ip.to_string()),
            Leaf::ReservationId => eq_or_wrong("reservation-id", body, &vm.reservation_id),
            Leaf::LaunchIndex => {
                eq_or_wrong("ami-launch-index", body, &vm.launch_index.to_string())
            }
            Leaf::OpensshKey => match &vm.ssh_key {
                Some(k) => eq_or_wrong("openssh-key", body, k),
                None => Err(wrong("openssh-key", body, "")),
            },
            Leaf::Other => Ok(()),
        },
        Check::NotFound | Check::UserData => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm() -> VmSpec {
        VmSpec {
            ip: "127.16.0.2".parse().unwrap(),
            uuid: "00000001-5707-4000-8000-000000000000".to_owned(),
            hostname: "vm-1".to_owned(),
            instance_id: "i-00000001".to_owned(),
            reservation_id: "r-00000001".to_owned(),
            launch_index: 0,
            user_data: Some(b"#cloud-config\n".to_vec()),
            ssh_key: Some("ssh-ed25519 AAAA vm-1@storm".to_owned()),
        }
    }

    fn kind(r: Result<(), Failure>) -> Option<ErrorKind> {
        r.err().map(|(k, _)| k)
    }

    #[test]
    fn meta_data_identity() {
        let v = vm();
        let ok =
            br#"{"uuid": "00000001-5707-4000-8000-000000000000", "hostname": "vm-1.novalocal"}"#;
        assert_eq!(kind(check(&v, Check::MetaData, 200, ok)), None);
        let other =
            br#"{"uuid": "00000002-5707-4000-8000-000000000001", "hostname": "vm-2.novalocal"}"#;
        assert_eq!(
            kind(check(&v, Check::MetaData, 200, other)),
            Some(ErrorKind::WrongVm)
        );
        let prefix = br#"{"uuid": "00000001-5707-4000-8000-000000000000", "hostname": "vm-10"}"#;
        assert_eq!(
            kind(check(&v, Check::MetaData, 200, prefix)),
            Some(ErrorKind::WrongVm)
        );
        assert_eq!(
            kind(check(&v, Check::MetaData, 200, b"{")),
            Some(ErrorKind::Body)
        );
        assert_eq!(
            kind(check(&v, Check::MetaData, 404, ok)),
            Some(ErrorKind::Status)
        );
    }

    #[test]
    fn ec2_leaves() {
        let v = vm();
        let leaf = |n| Check::Leaf(Leaf::from_name(n));
        assert_eq!(
            kind(check(&v, leaf("instance-id"), 200, b"i-00000001")),
            None
        );
        assert_eq!(
            kind(check(&v, leaf("instance-id"), 200, b"i-00000002")),
            Some(ErrorKind::WrongVm)
        );
        assert_eq!(
            kind(check(&v, leaf("local-hostname"), 200, b"vm-1.novalocal")),
            None
        );
        assert_eq!(
            kind(check(&v, leaf("local-ipv4"), 200, b"127.16.0.2")),
            None
        );
        assert_eq!(
            kind(check(&v, leaf("local-ipv4"), 200, b"127.16.0.20")),
            Some(ErrorKind::WrongVm)
        );
        assert_eq!(kind(check(&v, leaf("public-ipv4"), 200, b"")), None);
        assert_eq!(
            kind(check(&v, Check::NotFound, 200, b"i-00000001")),
            Some(ErrorKind::Status)
        );
    }

    #[test]
    fn user_data_and_network_data() {
        let mut v = vm();
        assert_eq!(
            kind(check(&v, Check::UserData, 200, b"#cloud-config\n")),
            None
        );
        assert_eq!(
            kind(check(&v, Check::UserData, 200, b"#cloud-config\n#x")),
            Some(ErrorKind::WrongVm)
        );
        let nd = br#"{"links": [], "networks": [{"ip_address": "127.16.0.2"}], "services": []}"#;
        assert_eq!(kind(check(&v, Check::NetworkData, 200, nd)), None);
        let other = br#"{"networks": [{"ip_address": "127.16.0.3"}]}"#;
        assert_eq!(
            kind(check(&v, Check::NetworkData, 200, other)),
            Some(ErrorKind::WrongVm)
        );
        v.user_data = None;
        assert_eq!(kind(check(&v, Check::UserData, 404, b"")), None);
    }
}
