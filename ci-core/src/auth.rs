//! Shared secrets: comparing them without leaking timing, and making new
//! ones.
//!
//! Two kinds exist. The *agent token* is configured on the server and every
//! agent; it gates the agent protocol in both directions. The *session
//! secret* is issued to one agent at registration (when it asks for one) and
//! proves that agent's identity afterwards, so that no agent can speak for
//! another's builds even though all of them know the token.

use std::io::Read;

/// Header carrying an agent's session secret.
pub const SESSION_HEADER: &str = "x-agent-secret";

/// Compares two secrets in time that depends only on their lengths.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Checks an `Authorization` header value against `Bearer <token>`.
pub fn bearer_matches(header: Option<&str>, token: &str) -> bool {
    let presented = header.and_then(|h| h.strip_prefix("Bearer ")).unwrap_or("");
    ct_eq(presented.trim().as_bytes(), token.as_bytes())
}

/// Fills `buf` with random bytes from the operating system.
pub fn random_bytes(buf: &mut [u8]) -> std::io::Result<()> {
    std::fs::File::open("/dev/urandom")?.read_exact(buf)
}

/// 128 random bits from the operating system, as 32 hex digits.
pub fn random_secret() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compares() {
        assert!(ct_eq(b"abc", b"abc"));
        assert!(!ct_eq(b"abc", b"abd"));
        assert!(!ct_eq(b"abc", b"abcd"));
        assert!(bearer_matches(Some("Bearer t0k"), "t0k"));
        assert!(!bearer_matches(Some("Bearer t0"), "t0k"));
        assert!(!bearer_matches(Some("t0k"), "t0k"));
        assert!(!bearer_matches(None, "t0k"));
    }

    #[test]
    fn secrets_are_fresh() {
        let a = random_secret().unwrap();
        let b = random_secret().unwrap();
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
    }
}
