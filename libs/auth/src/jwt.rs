//! NATS JWTs (v2): claims signed with an nkey, as nats-server's decentralized authentication
//! reads them, and the standard `.creds` file that carries a user's JWT and seed.

use data_encoding::{BASE32_NOPAD, BASE64URL_NOPAD};
use nkeys::KeyPair;
use serde_json::{json, Value};
use sha2::{Digest, Sha512_256};

use crate::AuthError;

const HEADER: &str = r#"{"typ":"JWT","alg":"ed25519-nkey"}"#;

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Sign `nats` (the type-specific claims) for `subject`, issued by `issuer`. `expires` in
/// seconds since the epoch; `None` never expires.
pub fn encode(
    issuer: &KeyPair,
    subject: &str,
    name: &str,
    expires: Option<u64>,
    nats: Value,
) -> Result<String, AuthError> {
    let mut claims = json!({
        "iat": now(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    if let Some(exp) = expires {
        claims["exp"] = exp.into();
    }
    // The id is the hash of the claims without it, as the NATS tools compute it.
    let body = serde_json::to_vec(&claims).expect("JSON values serialize");
    claims["jti"] = BASE32_NOPAD.encode(&Sha512_256::digest(&body)).into();
    let signing_input = format!(
        "{}.{}",
        BASE64URL_NOPAD.encode(HEADER.as_bytes()),
        BASE64URL_NOPAD.encode(&serde_json::to_vec(&claims).expect("JSON values serialize"))
    );
    let signature = issuer
        .sign(signing_input.as_bytes())
        .map_err(|e| AuthError::Key(e.to_string()))?;
    Ok(format!(
        "{signing_input}.{}",
        BASE64URL_NOPAD.encode(&signature)
    ))
}

/// The claims of a JWT, not verified (the server verifies; this reads our own files).
pub fn claims(jwt: &str) -> Result<Value, AuthError> {
    let body = jwt
        .split('.')
        .nth(1)
        .ok_or_else(|| AuthError::Invalid("not a JWT".into()))?;
    let bytes = BASE64URL_NOPAD
        .decode(body.trim_end_matches('=').as_bytes())
        .map_err(|e| AuthError::Invalid(format!("JWT body: {e}")))?;
    serde_json::from_slice(&bytes).map_err(|e| AuthError::Invalid(format!("JWT claims: {e}")))
}

/// The `.creds` file of a user: its JWT and its seed, in the layout every NATS client reads.
pub fn creds_file(jwt: &str, seed: &str) -> String {
    format!(
        "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
         ************************* IMPORTANT *************************\n\
         NKEY Seed printed below can be used to sign and prove identity.\n\
         NKEYs are sensitive and should be treated as secrets.\n\n\
         -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n\n\
         *************************************************************\n"
    )
}

/// The JWT of a `.creds` file.
pub fn jwt_of_creds(creds: &str) -> Result<&str, AuthError> {
    block_of_creds(creds, "-----BEGIN NATS USER JWT", "user JWT")
}

/// The user's key pair of a `.creds` file (from its seed).
pub fn key_pair_of_creds(creds: &str) -> Result<KeyPair, AuthError> {
    let seed = block_of_creds(creds, "-----BEGIN USER NKEY SEED", "user seed")?;
    KeyPair::from_seed(seed)
        .map_err(|e| AuthError::Invalid(format!("the credentials' user seed: {e}")))
}

/// The first line that is not empty after the `begin` line of a `.creds` file. (Read by
/// lines rather than with async-nats's parser, whose regular expression takes a third of a
/// millisecond to compile at every agent's start.)
fn block_of_creds<'a>(creds: &'a str, begin: &str, what: &str) -> Result<&'a str, AuthError> {
    let mut lines = creds.lines().map(str::trim);
    lines
        .by_ref()
        .find(|line| line.starts_with(begin))
        .ok_or_else(|| AuthError::Invalid(format!("no {what} in the credentials")))?;
    lines
        .find(|line| !line.is_empty())
        .ok_or_else(|| AuthError::Invalid(format!("empty {what} in the credentials")))
}
