//! Console sessions: an operator's own NATS connection, opened with the `.creds` they logged
//! in with, behind a random token in a cookie. Kept in memory (a restart logs everyone out),
//! bounded in number, ended at their expiry or on logout (the connection is closed).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;

use crate::Failure;

pub const COOKIE: &str = "hodei_session";
/// Most sessions at once; the oldest ends when one more logs in.
const MAX_SESSIONS: usize = 64;
/// Largest `.creds` accepted (a real one is about 2 KiB).
const MAX_CREDS_BYTES: usize = 16 * 1024;
/// An API the operator role has and a submitter's has not: a credential that may publish
/// it is an operator's.
const OPERATOR_SUBJECT: &str = hodei_protocol::subjects::API_WORKERS_LIST;

pub struct Session {
    pub client: async_nats::Client,
    pub js: async_nats::jetstream::Context,
    /// The credential's name.
    pub user: String,
    /// Every form of this session carries it.
    pub csrf: String,
    pub expires: Instant,
}

impl Session {
    pub fn check_csrf(&self, csrf: &str) -> Result<(), Failure> {
        // Both are ours or random; a plain comparison leaks nothing worth timing.
        if csrf == self.csrf {
            Ok(())
        } else {
            Err(Failure::Forbidden)
        }
    }
}

pub struct Sessions {
    by_token: Mutex<HashMap<String, Arc<Session>>>,
    lasts: Duration,
}

fn random_token() -> String {
    format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    )
}

fn token_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, token)| token.to_owned())
}

impl Sessions {
    pub fn new(lasts: Duration) -> Sessions {
        Sessions {
            by_token: Mutex::new(HashMap::new()),
            lasts,
        }
    }

    /// Log in with the text of a `.creds` file: nats-server must accept it, and it must be an
    /// operator's. Returns the session's token and the credential's name; the reason
    /// otherwise (never the credential).
    pub async fn open(&self, nats_url: &str, creds: &str) -> Result<(String, String), String> {
        if creds.len() > MAX_CREDS_BYTES {
            return Err("that is not a .creds file (too large)".into());
        }
        let claims = hodei_auth::jwt::jwt_of_creds(creds)
            .and_then(hodei_auth::jwt::claims)
            .map_err(|_| "that is not a .creds file (paste the whole file)".to_owned())?;
        let user = claims["name"].as_str().unwrap_or_default().to_owned();
        let may_publish = |subject: &str| {
            claims["nats"]["pub"]["allow"]
                .as_array()
                .is_some_and(|allowed| allowed.iter().any(|s| s.as_str() == Some(subject)))
        };
        if !hodei_auth::roles::valid_name(&user) || !may_publish(OPERATOR_SUBJECT) {
            return Err(
                "this credential is not an operator's (hodei auth creds --role operator)".into(),
            );
        }
        let options = async_nats::ConnectOptions::with_credentials(creds)
            .map_err(|_| "that is not a .creds file (paste the whole file)".to_owned())?
            .custom_inbox_prefix(hodei_auth::inbox_prefix(&user))
            .name(format!("hodei-console:{user}"))
            .connection_timeout(Duration::from_secs(5))
            // A page's live stream that stalls holds at most this many messages.
            .subscription_capacity(1024);
        let servers = hodei_messaging::servers(nats_url).map_err(|e| e.to_string())?;
        let client = options
            .connect(servers)
            .await
            .map_err(|e| format!("NATS refused the credential or is not reachable: {e}"))?;
        let session = Arc::new(Session {
            js: async_nats::jetstream::new(client.clone()),
            client,
            user: user.clone(),
            csrf: random_token(),
            expires: Instant::now() + self.lasts,
        });
        let token = random_token();
        let ended = {
            let mut sessions = self.by_token.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let mut ended: Vec<Arc<Session>> = Vec::new();
            sessions.retain(|_, s| {
                let alive = s.expires > now;
                if !alive {
                    ended.push(s.clone());
                }
                alive
            });
            if sessions.len() >= MAX_SESSIONS {
                if let Some(oldest) = sessions
                    .iter()
                    .min_by_key(|(_, s)| s.expires)
                    .map(|(t, _)| t.clone())
                {
                    ended.extend(sessions.remove(&oldest));
                }
            }
            sessions.insert(token.clone(), session);
            ended
        };
        for session in ended {
            let _ = session.client.drain().await;
        }
        Ok((token, user))
    }

    /// End the sessions that have expired, and close their connections.
    pub async fn reap(&self) {
        let now = Instant::now();
        let ended: Vec<Arc<Session>> = {
            let mut sessions = self.by_token.lock().unwrap_or_else(|e| e.into_inner());
            let expired: Vec<String> = sessions
                .iter()
                .filter(|(_, s)| s.expires <= now)
                .map(|(t, _)| t.clone())
                .collect();
            expired.iter().filter_map(|t| sessions.remove(t)).collect()
        };
        for session in ended {
            tracing::info!(user = %session.user, "session expired");
            let _ = session.client.drain().await;
        }
    }

    /// The live session of the request's cookie.
    pub fn of(&self, headers: &HeaderMap) -> Option<Arc<Session>> {
        let token = token_of(headers)?;
        let sessions = self.by_token.lock().unwrap_or_else(|e| e.into_inner());
        sessions
            .get(&token)
            .filter(|s| s.expires > Instant::now())
            .cloned()
    }

    /// End the request's session and close its connection.
    pub async fn close(&self, headers: &HeaderMap) {
        let Some(token) = token_of(headers) else {
            return;
        };
        let ended = self
            .by_token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&token);
        if let Some(session) = ended {
            let _ = session.client.drain().await;
        }
    }
}
