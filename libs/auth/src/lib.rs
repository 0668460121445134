//! Authentication and authorization on NATS with the server's own mechanism: decentralized
//! JWT auth with nkeys. An operator signs two accounts (the system account and `HODEI`);
//! every user of `HODEI` (a service, a client role, one worker) has a JWT signed by the
//! account's signing key that lists exactly the subjects it may use ([`roles`]).
//!
//! [`Authority::init`] creates (once) and loads the keys of a state folder and writes the
//! server's part of the configuration; [`Signer`] is what the provider-manager holds to mint
//! each worker's short-lived credential, and nothing more.

pub mod jwt;
pub mod roles;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nkeys::KeyPair;
use serde_json::json;

pub use roles::{inbox_prefix, permissions, worker_consumer, Permissions, Role};

/// The control plane's services: each connects as its own user (`creds/<name>.creds`).
pub const SERVICES: [&str; 6] = [
    "relay",
    "scheduler",
    "dispatcher",
    "registry",
    "provider-manager",
    "audit",
];

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key: {0}")]
    Key(String),
    #[error("invalid credentials: {0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthError + '_ {
    move |source| AuthError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Write a file readable by its owner only (keys and credentials), synced to disk.
pub fn write_private(path: &Path, contents: &str) -> Result<(), AuthError> {
    write_owner_only(path, contents, true)
}

/// Write a file readable by its owner only; `sync`: wait until it is on disk (keys), or not
/// (a worker's credential, which nothing needs after a crash).
pub fn write_owner_only(path: &Path, contents: &str, sync: bool) -> Result<(), AuthError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    if let Some(parent) = path.parent() {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io(parent))?;
    }
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(contents.as_bytes()).map_err(io(&tmp))?;
    if sync {
        file.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// Ask the CPU, once, which instructions the signing and hashing code may use (ed25519's
/// curve arithmetic and SHA-2 each keep the answer in a static of their own). A process that
/// forks many others calls it before its first fork (the agent spawner): each child then
/// inherits the answer instead of asking again with `cpuid`, which traps to the hypervisor on
/// a virtual machine. Signs with a throwaway key made from fixed bytes, which holds no secret.
pub fn detect_cpu_features() {
    use sha2::Digest;
    if let Ok(key) = KeyPair::new_from_raw(nkeys::KeyPairType::User, [1; 32]) {
        let _ = key.sign(b"");
    }
    let _ = sha2::Sha256::digest(b"");
}

fn key_from_seed(seed: &str) -> Result<KeyPair, AuthError> {
    KeyPair::from_seed(seed.trim()).map_err(|e| AuthError::Key(e.to_string()))
}

/// Load the seed in `path`, or create a key with `new` and keep its seed there.
fn load_or_create(path: &Path, new: fn() -> KeyPair) -> Result<KeyPair, AuthError> {
    match std::fs::read_to_string(path) {
        Ok(seed) => key_from_seed(&seed),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = new();
            write_private(
                path,
                &key.seed().map_err(|e| AuthError::Key(e.to_string()))?,
            )?;
            Ok(key)
        }
        Err(e) => Err(io(path)(e)),
    }
}

/// The account's signing key as a user-minting service holds it: it signs users of that one
/// account and nothing else (it cannot change accounts or the operator).
pub struct Signer {
    key: KeyPair,
    account: String,
}

impl Signer {
    /// Read a signer file (`Authority::signer_path`).
    pub fn load(path: &Path) -> Result<Signer, AuthError> {
        let text = std::fs::read_to_string(path).map_err(io(path))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| AuthError::Invalid(format!("{}: {e}", path.display())))?;
        let field = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| AuthError::Invalid(format!("{}: no {name}", path.display())))
        };
        Ok(Signer {
            key: key_from_seed(&field("seed")?)?,
            account: field("account")?,
        })
    }

    /// A `.creds` file for a new user `name` with `role`, valid for `ttl` (`None`: no expiry).
    pub fn mint(
        &self,
        name: &str,
        role: &Role,
        ttl: Option<Duration>,
    ) -> Result<String, AuthError> {
        if !roles::valid_name(name) {
            return Err(AuthError::Invalid(format!(
                "credential name {name:?}: use letters, digits, '-' and '_' (at most 64)"
            )));
        }
        let user = KeyPair::new_user();
        let perms = permissions(role, name);
        let nats = json!({
            "pub": { "allow": perms.publish },
            "sub": { "allow": perms.subscribe },
            "subs": -1, "data": -1, "payload": -1,
            "issuer_account": self.account,
            "tags": [format!("hodei-role:{}", role.as_str())],
            "type": "user", "version": 2,
        });
        let expires = ttl.map(|ttl| jwt::now() + ttl.as_secs().max(1));
        let token = jwt::encode(&self.key, &user.public_key(), name, expires, nats)?;
        let seed = user.seed().map_err(|e| AuthError::Key(e.to_string()))?;
        Ok(jwt::creds_file(&token, &seed))
    }

    /// Mint and write the credential to `path` (owner-only).
    pub fn write_creds(
        &self,
        path: &Path,
        name: &str,
        role: &Role,
        ttl: Option<Duration>,
    ) -> Result<(), AuthError> {
        write_private(path, &self.mint(name, role, ttl)?)
    }
}

/// The keys of one Hodei installation, kept in a state folder:
/// `operator.nk`, `system.nk`, `account.nk` (seeds), `signer.json` (the account's signing
/// key, for the services that mint users), and `auth.conf` (what nats-server needs).
pub struct Authority {
    dir: PathBuf,
    operator: KeyPair,
    system: KeyPair,
    account: KeyPair,
    signer: Signer,
}

impl Authority {
    /// Load the keys under `dir`, creating whatever is missing (idempotent).
    pub fn init(dir: &Path) -> Result<Authority, AuthError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let operator = load_or_create(&dir.join("operator.nk"), KeyPair::new_operator)?;
        let system = load_or_create(&dir.join("system.nk"), KeyPair::new_account)?;
        let account = load_or_create(&dir.join("account.nk"), KeyPair::new_account)?;
        let signer_path = dir.join("signer.json");
        let signer = match Signer::load(&signer_path) {
            Ok(signer) => signer,
            Err(AuthError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let key = KeyPair::new_account();
                let seed = key.seed().map_err(|e| AuthError::Key(e.to_string()))?;
                write_private(
                    &signer_path,
                    &json!({"account": account.public_key(), "seed": seed}).to_string(),
                )?;
                Signer {
                    key,
                    account: account.public_key(),
                }
            }
            Err(e) => return Err(e),
        };
        let authority = Authority {
            dir: dir.to_owned(),
            operator,
            system,
            account,
            signer,
        };
        write_private(&dir.join("auth.conf"), &authority.server_conf()?)?;
        Ok(authority)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    pub fn signer_path(&self) -> PathBuf {
        self.dir.join("signer.json")
    }

    /// The server's part of its configuration: the operator, the system account and the
    /// accounts, preloaded (`include auth.conf` from the server's configuration).
    pub fn server_conf(&self) -> Result<String, AuthError> {
        let operator = jwt::encode(
            &self.operator,
            &self.operator.public_key(),
            "hodei",
            None,
            json!({"system_account": self.system.public_key(), "type": "operator", "version": 2}),
        )?;
        let system = jwt::encode(
            &self.operator,
            &self.system.public_key(),
            "SYS",
            None,
            json!({
                "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                           "wildcards": true, "conn": -1, "leaf": -1},
                "type": "account", "version": 2,
            }),
        )?;
        let account = jwt::encode(
            &self.operator,
            &self.account.public_key(),
            "HODEI",
            None,
            json!({
                "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                           "wildcards": true, "conn": -1, "leaf": -1,
                           "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1},
                "signing_keys": [self.signer.key.public_key()],
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account", "version": 2,
            }),
        )?;
        Ok(format!(
            "# Written by Hodei (hodei-auth): the operator, the system account and the HODEI\n\
             # account, preloaded. Keys are beside this file; never commit them.\n\
             operator: \"{operator}\"\n\
             system_account: {sys}\n\
             resolver: MEMORY\n\
             resolver_preload: {{\n  {sys}: \"{system}\"\n  {acc}: \"{account}\"\n}}\n",
            sys = self.system.public_key(),
            acc = self.account.public_key(),
        ))
    }

    /// A `nats-server` configuration: `listen`, JetStream in `store_dir`, `extra` lines, and
    /// the operator and accounts of [`Authority::server_conf`].
    pub fn write_server_conf(
        &self,
        path: &Path,
        listen: &str,
        store_dir: &Path,
        extra: &str,
    ) -> Result<(), AuthError> {
        let conf = format!(
            "# Written by Hodei. Every connection authenticates (JWT + nkey).\n\
             listen: \"{listen}\"\n\
             jetstream {{ store_dir: \"{}\" }}\n\
             {extra}\n\
             {}",
            store_dir.display(),
            self.server_conf()?,
        );
        write_private(path, &conf)
    }

    /// Write the credential of user `name` with `role` under `creds/<name>.creds`; returns
    /// its path. An existing file is kept (its key stays the same across runs).
    pub fn ensure_creds(&self, name: &str, role: &Role) -> Result<PathBuf, AuthError> {
        let path = self.dir.join("creds").join(format!("{name}.creds"));
        if !path.is_file() {
            self.signer.write_creds(&path, name, role, None)?;
        }
        Ok(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minted_credential_is_a_standard_creds_file_with_the_role_in_its_jwt() {
        let dir = std::env::temp_dir().join(format!("hodei-auth-{}", uuid::Uuid::new_v4()));
        let authority = Authority::init(&dir).unwrap();
        let worker_id = uuid::Uuid::new_v4();
        let creds = authority
            .signer()
            .mint(
                &worker_id.to_string(),
                &Role::Worker {
                    worker_id,
                    job_id: None,
                },
                Some(Duration::from_secs(60)),
            )
            .unwrap();
        let claims = jwt::claims(jwt::jwt_of_creds(&creds).unwrap()).unwrap();
        assert_eq!(claims["name"], worker_id.to_string());
        // The seed is the user's key: the JWT's subject.
        let user = jwt::key_pair_of_creds(&creds).unwrap();
        assert_eq!(claims["sub"], user.public_key());
        assert!(jwt::key_pair_of_creds(&creds.replace("SEED-----\nSU", "SEED-----\nXX")).is_err());
        assert_eq!(claims["nats"]["type"], "user");
        assert_eq!(
            claims["nats"]["sub"]["allow"],
            json!([format!("_INBOX.{worker_id}.>")])
        );
        assert!(claims["exp"].as_u64().unwrap() > jwt::now());
        assert!(creds.contains("-----BEGIN USER NKEY SEED-----\nSU"));
        // The same folder loads the same keys.
        let again = Authority::init(&dir).unwrap();
        assert_eq!(again.account.public_key(), authority.account.public_key());
        assert!(authority
            .signer()
            .mint("no spaces", &Role::Submitter, None)
            .is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
