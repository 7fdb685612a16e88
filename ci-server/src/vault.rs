//! Sealing secrets: XChaCha20-Poly1305 with a key the server keeps in a
//! file outside the database (`SECRET_KEY_FILE`), made on first start
//! with permissions 0600. A stolen database (or backup) without the key
//! file gives away no value.
//!
//! Each sealed value is `nonce (24 bytes) || ciphertext`, bound to its
//! project and name (the associated data): a value copied to another row
//! does not open.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};

use crate::Error;

const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 24;

/// Seals and opens secrets with the server's key.
pub struct Vault {
    cipher: XChaCha20Poly1305,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Vault(..)")
    }
}

fn key_error(path: &Path, why: impl std::fmt::Display) -> Error {
    Error::Config {
        name: "SECRET_KEY_FILE",
        reason: format!("{}: {why}", path.display()),
    }
}

impl Vault {
    /// The vault of the key in `path`, made (0600) if there is none. A
    /// key file others can read is refused.
    pub fn open(path: &Path) -> Result<Vault, Error> {
        let key = match std::fs::read(path) {
            Ok(bytes) => {
                let meta = std::fs::metadata(path).map_err(|e| key_error(path, e))?;
                if meta.permissions().mode() & 0o077 != 0 {
                    return Err(key_error(
                        path,
                        "readable by others: `chmod 600` it (it opens every secret)",
                    ));
                }
                let hex = String::from_utf8_lossy(&bytes);
                decode_hex(hex.trim())
                    .filter(|k| k.len() == KEY_LEN)
                    .ok_or_else(|| key_error(path, "not a key: expected 64 hex digits"))?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = vec![0u8; KEY_LEN];
                ci_core::auth::random_bytes(&mut key).map_err(|e| key_error(path, e))?;
                let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
                // N.B.: created 0600 and never over an existing file, so two
                // servers starting at once cannot each make their own.
                let mut file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| key_error(path, e))?;
                file.write_all(format!("{hex}\n").as_bytes())
                    .and_then(|()| file.sync_all())
                    .map_err(|e| key_error(path, e))?;
                tracing::info!(path = %path.display(), "made a new key for secrets");
                key
            }
            Err(e) => return Err(key_error(path, e)),
        };
        let cipher = XChaCha20Poly1305::new_from_slice(&key).map_err(|e| key_error(path, e))?;
        Ok(Vault { cipher })
    }

    fn aad(project: &str, name: &str) -> Vec<u8> {
        format!("{project}\0{name}").into_bytes()
    }

    /// `value` sealed for the secret `name` of `project`.
    pub fn seal(&self, project: &str, name: &str, value: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        ci_core::auth::random_bytes(&mut nonce)?;
        let aad = Self::aad(project, name);
        let sealed = self
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: value,
                    aad: &aad,
                },
            )
            .map_err(|_| std::io::Error::other("sealing failed"))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        Ok(out)
    }

    /// The value sealed for `name` of `project`; `None` if it does not
    /// open (another key, another row, damaged).
    pub fn open_value(&self, project: &str, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let aad = Self::aad(project, name);
        self.cipher
            .decrypt(XNonce::from_slice(nonce), Payload { msg: body, aad: &aad })
            .ok()
    }
}

/// The bytes hex digits spell; none if they do not.
pub(crate) fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| s.get(i..i + 2).and_then(|b| u8::from_str_radix(b, 16).ok()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_opens_and_binds_to_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let vault = Vault::open(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let sealed = vault.seal("web", "TOKEN", b"hunter2").unwrap();
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
        assert_eq!(vault.open_value("web", "TOKEN", &sealed).unwrap(), b"hunter2");
        assert!(vault.open_value("web", "OTHER", &sealed).is_none());
        assert!(vault.open_value("api", "TOKEN", &sealed).is_none());
        // The same key next start; another key opens nothing.
        let again = Vault::open(&path).unwrap();
        assert_eq!(again.open_value("web", "TOKEN", &sealed).unwrap(), b"hunter2");
        let other = Vault::open(&dir.path().join("other.key")).unwrap();
        assert!(other.open_value("web", "TOKEN", &sealed).is_none());
        // A key others can read is refused.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Vault::open(&path).unwrap_err().to_string().contains("chmod 600"));
        std::fs::write(dir.path().join("bad.key"), "xyz").unwrap();
        std::fs::set_permissions(dir.path().join("bad.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Vault::open(&dir.path().join("bad.key")).is_err());
    }
}
