//! Who may do what: the users file (argon2id password hashes, roles, and
//! hashed bearer tokens for other dashboards), login sessions with their
//! CSRF token, and the login rate limit.
//!
//! ```toml
//! [users.alice]
//! role = "admin"
//! hash = "$argon2id$v=19$m=19456,t=2,p=1$..."
//!
//! [tokens.hv1-dashboard]
//! role = "viewer"
//! sha256 = "9f86d08..."
//! ```

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::RngCore;
use serde::{Deserialize, Serialize};

/// What a user may do: viewers see; operators back up and restore; admins
/// also protect, prune and collect garbage.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Viewer,
    Operator,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserEntry {
    pub role: Role,
    /// PHC string of the argon2id hash.
    pub hash: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub role: Role,
    /// SHA-256 of the token, hex (tokens are long and random: no KDF needed).
    pub sha256: String,
}

/// The users file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Users {
    #[serde(default)]
    pub users: BTreeMap<String, UserEntry>,
    #[serde(default)]
    pub tokens: BTreeMap<String, TokenEntry>,
}

impl Users {
    /// Reads the file; a missing file is no users (nobody can log in).
    pub fn load(path: &Path) -> Result<Users> {
        match std::fs::read_to_string(path) {
            Ok(t) => toml::from_str(&t).with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Users::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Writes the file atomically, readable by its owner only.
    pub fn save(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let text = toml::to_string(self)?;
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// Adds or replaces a user.
    pub fn add_user(&mut self, name: &str, role: Role, password: &str) -> Result<()> {
        check_name(name)?;
        if password.chars().count() < 8 {
            bail!("the password must have at least 8 characters");
        }
        let salt = SaltString::generate(&mut OsRng);
        let hash = Argon2::default()
            .hash_password(password.as_bytes(), &salt)
            .map_err(|e| anyhow::anyhow!("hashing the password: {e}"))?
            .to_string();
        self.users
            .insert(name.to_string(), UserEntry { role, hash });
        Ok(())
    }

    /// Adds or replaces a token; returns it (shown once, stored hashed).
    pub fn add_token(&mut self, name: &str, role: Role) -> Result<String> {
        check_name(name)?;
        let token = random_hex(32);
        self.tokens.insert(
            name.to_string(),
            TokenEntry {
                role,
                sha256: sha256_hex(&token),
            },
        );
        Ok(token)
    }

    /// The user's role if the password is right. Always runs one argon2
    /// verification, so an unknown name costs as long as a wrong password.
    pub fn check_password(&self, name: &str, password: &str) -> Option<Role> {
        static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let (hash, role) = match self.users.get(name) {
            Some(u) => (u.hash.as_str(), Some(u.role)),
            None => (dummy_hash(&DUMMY), None),
        };
        let ok = PasswordHash::new(hash).is_ok_and(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        });
        role.filter(|_| ok)
    }

    /// The token's name and role, if it is one of ours.
    pub fn check_token(&self, token: &str) -> Option<(String, Role)> {
        let h = sha256_hex(token);
        self.tokens
            .iter()
            .find(|(_, t)| same(t.sha256.as_bytes(), h.as_bytes()))
            .map(|(n, t)| (n.clone(), t.role))
    }
}

/// A hash of a random password, made once: what an unknown name is checked
/// against.
fn dummy_hash(cell: &'static std::sync::OnceLock<String>) -> &'static str {
    cell.get_or_init(|| {
        let salt = SaltString::generate(&mut OsRng);
        Argon2::default()
            .hash_password(random_hex(16).as_bytes(), &salt)
            .map(|h| h.to_string())
            .unwrap_or_default()
    })
}

fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c))
    {
        bail!("{name:?}: a name is 1-64 letters, digits, '-', '_', '.' or '@'");
    }
    Ok(())
}

pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rngs::OsRng.fill_bytes(&mut b);
    hex(&b)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn sha256_hex(s: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, s.as_bytes()).as_ref())
}

/// Equal, in time independent of where they differ.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// One login.
#[derive(Clone, Debug)]
pub struct Session {
    pub user: String,
    pub role: Role,
    /// Sent back by every change in `X-CSRF-Token`.
    pub csrf: String,
    expires: Instant,
}

/// Sessions in memory: a restart of `bulwark web` logs everybody out.
pub struct Sessions {
    ttl: Duration,
    map: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Sessions {
        Sessions {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session: its id (the cookie) and itself.
    pub fn create(&self, user: &str, role: Role) -> (String, Session) {
        let id = random_hex(32);
        let s = Session {
            user: user.to_string(),
            role,
            csrf: random_hex(32),
            expires: Instant::now() + self.ttl,
        };
        let mut map = self.lock();
        let now = Instant::now();
        map.retain(|_, s| s.expires > now);
        map.insert(id.clone(), s.clone());
        (id, s)
    }

    pub fn get(&self, id: &str) -> Option<Session> {
        let map = self.lock();
        map.get(id).filter(|s| s.expires > Instant::now()).cloned()
    }

    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// Failed logins allowed per client address and per user name in a window.
pub const MAX_FAILURES: usize = 5;
pub const WINDOW: Duration = Duration::from_secs(60);

/// The login rate limit: after [`MAX_FAILURES`] failures within [`WINDOW`]
/// from one address, or for one user name, further attempts are refused
/// (without checking the password) until the oldest failure ages out.
#[derive(Default)]
pub struct Limiter {
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl Limiter {
    fn keys(addr: &str, user: &str) -> [String; 2] {
        [format!("addr:{addr}"), format!("user:{user}")]
    }

    /// `Err(seconds to wait)` while either key is over the limit.
    pub fn check(&self, addr: &str, user: &str) -> Result<(), u64> {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let mut wait = 0;
        for k in Self::keys(addr, user) {
            if let Some(q) = map.get_mut(&k) {
                while q.front().is_some_and(|t| now.duration_since(*t) >= WINDOW) {
                    q.pop_front();
                }
                if q.len() >= MAX_FAILURES {
                    let oldest = q.front().copied().unwrap_or(now);
                    let left = WINDOW.saturating_sub(now.duration_since(oldest));
                    wait = wait.max(left.as_secs().max(1));
                }
            }
        }
        map.retain(|_, q| !q.is_empty());
        if wait > 0 {
            Err(wait)
        } else {
            Ok(())
        }
    }

    pub fn failed(&self, addr: &str, user: &str) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        for k in Self::keys(addr, user) {
            map.entry(k).or_default().push_back(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_and_tokens_check_and_are_stored_hashed() {
        let mut u = Users::default();
        u.add_user("alice", Role::Operator, "correct horse")
            .unwrap();
        assert!(u.users["alice"].hash.starts_with("$argon2id$"));
        assert_eq!(
            u.check_password("alice", "correct horse"),
            Some(Role::Operator)
        );
        assert_eq!(u.check_password("alice", "wrong horse!"), None);
        assert_eq!(u.check_password("bob", "correct horse"), None);
        assert!(u.add_user("bad name", Role::Admin, "long enough").is_err());
        assert!(u.add_user("carol", Role::Admin, "short").is_err());
        let t = u.add_token("hv1", Role::Viewer).unwrap();
        assert_eq!(t.len(), 64);
        assert!(!toml::to_string(&u).unwrap().contains(&t));
        assert_eq!(u.check_token(&t), Some(("hv1".into(), Role::Viewer)));
        assert_eq!(u.check_token("nope"), None);
        let back: Users = toml::from_str(&toml::to_string(&u).unwrap()).unwrap();
        assert_eq!(
            back.check_password("alice", "correct horse"),
            Some(Role::Operator)
        );
        assert!(Role::Viewer < Role::Operator && Role::Operator < Role::Admin);
    }

    #[test]
    fn the_limiter_refuses_after_five_failures_per_address_or_user() {
        let l = Limiter::default();
        for _ in 0..MAX_FAILURES {
            assert!(l.check("1.2.3.4", "alice").is_ok());
            l.failed("1.2.3.4", "alice");
        }
        let wait = l.check("1.2.3.4", "alice").unwrap_err();
        assert!((1..=60).contains(&wait), "{wait}");
        // The same user from elsewhere, and anyone from that address.
        assert!(l.check("5.6.7.8", "alice").is_err());
        assert!(l.check("1.2.3.4", "bob").is_err());
        assert!(l.check("5.6.7.8", "bob").is_ok());
    }

    #[test]
    fn sessions_expire() {
        let s = Sessions::new(Duration::from_millis(30));
        let (id, sess) = s.create("alice", Role::Viewer);
        assert_eq!(s.get(&id).unwrap().csrf, sess.csrf);
        std::thread::sleep(Duration::from_millis(40));
        assert!(s.get(&id).is_none());
        let (id, _) = s.create("alice", Role::Viewer);
        s.remove(&id);
        assert!(s.get(&id).is_none());
        assert!(same(b"abc", b"abc") && !same(b"abc", b"abd") && !same(b"ab", b"abc"));
    }
}
