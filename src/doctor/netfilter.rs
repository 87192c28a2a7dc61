//! Reading a `qrouter-` namespace's metadata rules from `iptables-save` or
//! `nft list ruleset` text, without IO: is the REDIRECT of
//! 169.254.169.254:80 to the proxy's port there, and is the port closed to
//! everything the REDIRECT did not bring (the INPUT rule)?
//!
//! Neutron's L3 agent writes (spec §2.1, `neutron/agent/metadata/driver.py`):
//! `-A neutron-l3-agent-PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp
//! --dport 80 -j REDIRECT --to-ports 9697` and, in filter, `-m mark --mark
//! 0x1/0xffff -j ACCEPT` then `-p tcp -m tcp --dport 9697 -j DROP`;
//! `deploy/qrouter-metadata-rules.sh` writes the REDIRECT into `PREROUTING`
//! and `--dport 9697 -m mark ! --mark 0x1/0xffff -j DROP` into `INPUT`.
//! Either form counts. With iptables-nft the same rules also show in `nft`'s
//! syntax (`ip daddr 169.254.169.254 … tcp dport 80 … redirect to :9697`),
//! which is what is read when `iptables-save` is not installed.
//!
//! A rule in a chain of its own counts only when the hook chain jumps to it
//! (iptables-save); nft chains are not followed (a rule anywhere in the
//! ruleset counts), which errs towards OK on hand-written nft rulesets.
//! Rejected: asking the kernel over netlink (`NFT_MSG_GETRULE`): a second
//! rule parser, for rules the operator reads in these same two formats.

/// The metadata address.
const METADATA_V4: &str = "169.254.169.254";

/// Whether `save` (`iptables-save` output) redirects 169.254.169.254:80 to
/// `port` in a chain reachable from nat `PREROUTING`.
pub fn iptables_has_redirect(save: &str, port: u16) -> bool {
    let to = format!("--to-ports {port}");
    rules_in(save, "nat", "PREROUTING").any(|r| {
        has_word(r, &format!("{METADATA_V4}/32"))
            && has_word(r, "--dport 80")
            && r.contains("-j REDIRECT")
            && (has_word(r, &to) || has_word(r, &format!("{to}-{port}")))
    })
}

/// What the filter rules do to the listener's port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRule {
    /// Nothing drops it: the listener is open on every address of the router.
    Missing,
    /// Dropped, but redirected (marked) traffic too: the DROP comes with no
    /// mark exception and after no ACCEPT of the mark.
    DropsRedirected,
    /// Dropped unless marked, as Neutron (ACCEPT the mark, then DROP) or
    /// the rules script (`! --mark … -j DROP`) have it.
    Ok,
}

/// [`InputRule`] for `port` in `save` (`iptables-save` output), over the
/// chains reachable from filter `INPUT`, in file order.
pub fn iptables_input_rule(save: &str, port: u16) -> InputRule {
    let dport = format!("--dport {port}");
    let mut mark_accepted = false;
    for r in rules_in(save, "filter", "INPUT") {
        let marks = r.contains("--mark");
        if marks && !r.contains("! --mark") && r.contains("-j ACCEPT") {
            mark_accepted = true;
        }
        if has_word(r, &dport) && (r.contains("-j DROP") || r.contains("-j REJECT")) {
            return if mark_accepted || r.contains("! --mark") {
                InputRule::Ok
            } else {
                InputRule::DropsRedirected
            };
        }
    }
    InputRule::Missing
}

/// Whether `ruleset` (`nft list ruleset`) has a rule redirecting
/// 169.254.169.254 port 80 to `port`.
pub fn nft_has_redirect(ruleset: &str, port: u16) -> bool {
    ruleset.lines().any(|l| {
        has_word(l, &format!("ip daddr {METADATA_V4}"))
            && has_word(l, "dport 80")
            && (has_word(l, &format!("redirect to :{port}"))
                || has_word(l, &format!("redirect to {port}")))
    })
}

/// [`InputRule`] for `port` in `ruleset` (`nft list ruleset`), over every
/// chain in order.
pub fn nft_input_rule(ruleset: &str, port: u16) -> InputRule {
    let dport = format!("dport {port}");
    let mut mark_accepted = false;
    for l in ruleset.lines() {
        let l = l.trim_end();
        let marks = l.contains("mark");
        if marks && !l.contains("!=") && l.ends_with("accept") {
            mark_accepted = true;
        }
        if has_word(l, &dport) && (l.ends_with("drop") || l.contains(" reject")) {
            return if mark_accepted || marks && l.contains("!=") {
                InputRule::Ok
            } else {
                InputRule::DropsRedirected
            };
        }
    }
    InputRule::Missing
}

/// `needle` in `hay` on word boundaries (so `--dport 80` is not `--dport 8080`).
fn has_word(hay: &str, needle: &str) -> bool {
    hay.match_indices(needle).any(|(i, _)| {
        let before = hay[..i].chars().next_back();
        let after = hay[i + needle.len()..].chars().next();
        before.is_none_or(|c| c.is_whitespace() || c == '"')
            && after.is_none_or(|c| c.is_whitespace() || c == '"')
    })
}

/// The rules (`-A CHAIN …` lines) of `table` in chains reachable from
/// `chain` by `-j`/`-g` jumps.
fn rules_in<'a>(save: &'a str, table: &str, chain: &str) -> impl Iterator<Item = &'a str> {
    let mut lines = Vec::new();
    let mut current = None;
    for l in save.lines() {
        if let Some(t) = l.strip_prefix('*') {
            current = Some(t.trim());
        } else if current == Some(table) && l.starts_with("-A ") {
            lines.push(l);
        }
    }
    let chain_of = |l: &str| l.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut reachable = vec![chain.to_string()];
    let mut i = 0;
    while i < reachable.len() {
        let from = reachable[i].clone();
        for l in lines.iter().filter(|l| chain_of(l) == from) {
            let mut words = l.split_whitespace();
            while let Some(w) = words.next() {
                if w == "-j" || w == "-g" {
                    if let Some(target) = words.next() {
                        if !reachable.iter().any(|c| c == target) {
                            reachable.push(target.to_string());
                        }
                    }
                }
            }
        }
        i += 1;
    }
    lines
        .into_iter()
        .filter(move |l| reachable.contains(&chain_of(l)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What Neutron's L3 agent leaves in a router namespace (abridged).
    const NEUTRON: &str = "\
*nat
:PREROUTING ACCEPT [0:0]
:neutron-l3-agent-PREROUTING - [0:0]
-A PREROUTING -j neutron-l3-agent-PREROUTING
-A neutron-l3-agent-PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 9697
COMMIT
*filter
:INPUT ACCEPT [0:0]
:neutron-l3-agent-INPUT - [0:0]
-A INPUT -j neutron-l3-agent-INPUT
-A neutron-l3-agent-INPUT -m mark --mark 0x1/0xffff -j ACCEPT
-A neutron-l3-agent-INPUT -p tcp -m tcp --dport 9697 -j DROP
COMMIT
";

    #[test]
    fn neutrons_rules_are_found_through_their_chains() {
        assert!(iptables_has_redirect(NEUTRON, 9697));
        assert_eq!(iptables_input_rule(NEUTRON, 9697), InputRule::Ok);
        assert!(!iptables_has_redirect(NEUTRON, 9698));
        assert_eq!(iptables_input_rule(NEUTRON, 969), InputRule::Missing);
        let no_accept = NEUTRON.replace(
            "-A neutron-l3-agent-INPUT -m mark --mark 0x1/0xffff -j ACCEPT\n",
            "",
        );
        assert_eq!(
            iptables_input_rule(&no_accept, 9697),
            InputRule::DropsRedirected
        );
    }

    #[test]
    fn a_rule_in_an_unreferenced_chain_does_not_count() {
        let orphan = NEUTRON.replace("-A PREROUTING -j neutron-l3-agent-PREROUTING\n", "");
        assert!(!iptables_has_redirect(&orphan, 9697));
        let in_other_table = NEUTRON.replace("*nat", "*mangle");
        assert!(!iptables_has_redirect(&in_other_table, 9697));
    }

    #[test]
    fn the_rules_script_form_is_found() {
        let save = "*nat\n-A PREROUTING -d 169.254.169.254/32 -i qr-+ -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 9697\nCOMMIT\n*filter\n-A INPUT -p tcp -m tcp --dport 9697 -m mark ! --mark 0x1/0xffff -j DROP\nCOMMIT\n";
        assert!(iptables_has_redirect(save, 9697));
        assert_eq!(iptables_input_rule(save, 9697), InputRule::Ok);
        let port_8080 = save.replace("--dport 80 ", "--dport 8080 ");
        assert!(!iptables_has_redirect(&port_8080, 9697));
    }

    #[test]
    fn nft_syntax_of_the_same_rules() {
        let ruleset = r#"table ip nat {
	chain PREROUTING {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 169.254.169.254 iifname "qr-*" meta l4proto tcp tcp dport 80 counter packets 0 bytes 0 redirect to :9697
	}
}
table ip filter {
	chain INPUT {
		type filter hook input priority filter; policy accept;
		meta l4proto tcp tcp dport 9697 mark and 0x0000ffff != 0x00000001 counter packets 0 bytes 0 drop
	}
}
"#;
        assert!(nft_has_redirect(ruleset, 9697));
        assert_eq!(nft_input_rule(ruleset, 9697), InputRule::Ok);
        assert!(!nft_has_redirect(ruleset, 9698));
        assert_eq!(
            nft_input_rule("table ip filter {\n}\n", 9697),
            InputRule::Missing
        );
        let bare = "chain INPUT {\n\t\ttcp dport 9697 drop\n}\n";
        assert_eq!(nft_input_rule(bare, 9697), InputRule::DropsRedirected);
        let neutron_style = "chain INPUT {\n\t\tmeta mark & 0x0000ffff == 0x00000001 counter accept\n\t\ttcp dport 9697 counter drop\n}\n";
        assert_eq!(nft_input_rule(neutron_style, 9697), InputRule::Ok);
    }
}
