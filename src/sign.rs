//! Instance-id signatures shared by the agent (signs) and the API (verifies).
//!
//! Neutron and Nova agree on `X-Instance-ID-Signature` = lowercase hex of
//! HMAC-SHA256, keyed with the UTF-8 bytes of `metadata_proxy_shared_secret`,
//! over the UTF-8 bytes of the instance id. Verification is constant-time.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// What a daemon says at start, and `--check` prints, when the shared secret
/// `key` is empty. Nova and Neutron accept an empty secret (so refusing it
/// would break drop-in), but an HMAC keyed with nothing is one anyone can
/// compute: whoever reaches the API can claim to be any instance.
pub fn empty_secret_warning(key: &str) -> String {
    format!(
        "{key} is empty: instance signatures are keyed with nothing, so anyone who can reach \
         the metadata API can claim to be any instance; set the same secret in Nova's \
         [neutron] metadata_proxy_shared_secret, [api] and [agent]"
    )
}

/// Lowercase hex HMAC-SHA256 of `instance_id` keyed with `secret` (64 chars).
pub fn sign_instance_id(secret: &[u8], instance_id: &str) -> String {
    sign_instance_id_hex(secret, instance_id)
        .as_str()
        .to_owned()
}

/// A signature as its 64 lowercase hex digits, on the stack: the agent signs
/// and the API verifies every request without a heap allocation.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SignatureHex([u8; 64]);

impl SignatureHex {
    /// The 64 hex digits.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The 64 hex digits.
    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits are ever written into it.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for SignatureHex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SignatureHex(..)")
    }
}

/// [`sign_instance_id`] without the allocation.
pub fn sign_instance_id_hex(secret: &[u8], instance_id: &str) -> SignatureHex {
    Signer::new(secret).sign_hex(instance_id)
}

/// Constant-time check of a presented signature against the expected one.
pub fn verify_instance_signature(secret: &[u8], instance_id: &str, presented: &[u8]) -> bool {
    Signer::new(secret).verify(instance_id, presented)
}

/// HMAC-SHA256 keyed once with the shared secret: the key's inner and
/// outer pads are hashed here, and each signature starts from a copy of
/// that state, so it costs two SHA-256 blocks instead of four (the key's
/// two are the same for every request). Same signatures as
/// [`sign_instance_id`], which is built on it.
#[derive(Clone)]
pub struct Signer(HmacSha256);

impl Signer {
    /// A signer keyed with `secret` (any length, empty included).
    pub fn new(secret: &[u8]) -> Signer {
        Signer(HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length"))
    }

    /// The signature of `instance_id`, as 64 lowercase hex digits.
    pub fn sign_hex(&self, instance_id: &str) -> SignatureHex {
        let mut mac = self.0.clone();
        mac.update(instance_id.as_bytes());
        let tag = mac.finalize().into_bytes();
        let mut out = [0u8; 64];
        for (i, b) in tag.iter().enumerate() {
            out[2 * i] = b"0123456789abcdef"[usize::from(b >> 4)];
            out[2 * i + 1] = b"0123456789abcdef"[usize::from(b & 0xf)];
        }
        SignatureHex(out)
    }

    /// Constant-time check of `presented` against the signature of
    /// `instance_id`.
    pub fn verify(&self, instance_id: &str, presented: &[u8]) -> bool {
        let expected = self.sign_hex(instance_id);
        let expected = expected.as_bytes();
        if presented.len() != expected.len() {
            return false;
        }
        let mut diff = 0u8;
        for (a, b) in expected.iter().zip(presented) {
            diff |= a ^ b;
        }
        diff == 0
    }
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key, nor state derived from it.
        f.write_str("Signer(..)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Vector computed independently with Python:
    // hmac.new(b"s3cr3t-shared", b"00000001-0000-4000-8000-000000000001", hashlib.sha256).hexdigest()
    #[test]
    fn matches_python_hmac_vector() {
        let sig = sign_instance_id(b"s3cr3t-shared", "00000001-0000-4000-8000-000000000001");
        assert_eq!(sig, PY_VECTOR);
        assert!(verify_instance_signature(
            b"s3cr3t-shared",
            "00000001-0000-4000-8000-000000000001",
            PY_VECTOR.as_bytes()
        ));
        assert!(!verify_instance_signature(
            b"other",
            "00000001-0000-4000-8000-000000000001",
            PY_VECTOR.as_bytes()
        ));
        assert!(!verify_instance_signature(
            b"s3cr3t-shared",
            "00000001-0000-4000-8000-000000000001",
            &PY_VECTOR.as_bytes()[..63]
        ));
    }

    /// One keyed signer, used for many ids, signs each as a fresh key
    /// would: the cloned state carries nothing from one id to the next.
    /// Vectors from Python's `hmac`, including a key longer than SHA-256's
    /// block (which HMAC hashes first) and an empty one.
    #[test]
    fn a_signer_keyed_once_matches_python_for_every_id() {
        let long_key = [b'k'; 100];
        for (key, id, py) in [
            (
                &b"s3cr3t-shared"[..],
                "00000001-0000-4000-8000-000000000001",
                PY_VECTOR,
            ),
            // hmac.new(b"", b"vm", hashlib.sha256).hexdigest()
            (
                b"",
                "vm",
                "e7e8119d31cc6b1759f548b74d9bd2107b84805b55c1c83bdf83d2e3bff97949",
            ),
            // hmac.new(b"k" * 100, b"00000002-0000-4000-8000-000000000002", hashlib.sha256).hexdigest()
            (
                &long_key[..],
                "00000002-0000-4000-8000-000000000002",
                "0c30837d06e5f947cc300fdf6202c75ca1d87e728aa9ac5f5a5900f7a2c5c502",
            ),
        ] {
            let signer = Signer::new(key);
            for _ in 0..2 {
                let want = sign_instance_id(key, id);
                assert_eq!(want, py);
                assert_eq!(signer.sign_hex(id).as_str(), want);
                assert!(signer.verify(id, want.as_bytes()));
                assert!(!signer.verify(id, &want.as_bytes()[..63]));
                assert!(!signer.verify("other", want.as_bytes()));
            }
        }
    }

    const PY_VECTOR: &str = "52bc3ecd118534bece80ef465344364d6c809faafd3c50829b76ea14bfc258bf";
}
